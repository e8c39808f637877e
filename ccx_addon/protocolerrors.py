"""mitmproxy's own refusals (a request that is not valid HTTP/1, a body over
`body_size_limit`, a header block it cannot parse) in OpenAI's error shape instead of its
HTML page: every answer a client of the gateway gets is JSON it can show.

mitmproxy writes these answers below the addon API (`_http1.make_error_response`, the same
in 11.0 and 12.x), so the addon swaps that one function while it is loaded and puts the
original back on `done`. The swap is process-wide: every HTTP/1 listener of this mitmproxy
answers its protocol errors in this shape.
"""

import logging

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http1

from .errors import error_body

logger = logging.getLogger(__name__)

_CODES = {400: "invalid_http", 408: "request_timeout", 413: "request_too_large", 431: "request_header_fields_too_large"}


def protocol_error_message(status: int, message: str) -> tuple[str, str, str]:
    """(message, type, code) for one of mitmproxy's own error answers."""
    if status == 413:
        return (
            "The request body is larger than the gateway's limit (option ccx_max_body_size, "
            "applied as mitmproxy's body_size_limit).", "invalid_request_error", "request_too_large",
        )
    if 400 <= status < 500:
        return (f"The request was refused before it reached the gateway: {message}. Send a valid "
                "HTTP/1.1 request.", "invalid_request_error", _CODES.get(status, "invalid_request"))
    return (f"The gateway could not complete this request: {message}.", "server_error", "gateway_internal_error")


def openai_error_response(status_code: int, message: str = "") -> bytes:
    """Drop-in for mitmproxy's `make_error_response`: the same status and `Connection: close`."""
    text, type_, code = protocol_error_message(status_code, message)
    response = http.Response.make(
        status_code, error_body(text, type_, code),
        {"content-type": "application/json", "connection": "close", "x-ccx-gateway": "local"},
    )
    return http1.assemble_response(response)


class ProtocolErrors:
    def __init__(self) -> None:
        self._original = None

    def load(self, loader) -> None:
        if self._original is None and _http1.make_error_response is not openai_error_response:
            self._original = _http1.make_error_response
            _http1.make_error_response = openai_error_response

    def done(self) -> None:
        if self._original is not None:
            _http1.make_error_response = self._original
            self._original = None
