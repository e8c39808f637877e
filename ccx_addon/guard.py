"""Fail closed: any exception in any request-path hook of any gateway addon becomes an
OpenAI-shaped answer and one traceback in the log, never a fall-through to the reverse target.

mitmproxy runs every addon of one `-s` script inside a single hook call: an exception in one
addon's hook skips every later addon (the backstop included), and the request then goes to
the reverse target, the placeholder or a server the user named with `--mode`. So every hook
is wrapped where it is defined: the addon that failed answers for itself, and the later ones
see an answered flow. `make_addons()` wraps whatever it returns, so new addons are covered.
"""

import functools
import inspect
import logging
import traceback

from mitmproxy import http
from mitmproxy.addonmanager import traverse

from .errors import RequestRefused, error_response
from .state import SECRET_MASK, FlowRecord, GatewayState

logger = logging.getLogger(__name__)

# The hooks that run for a request; lifecycle hooks (load, configure, running, done) are not
# wrapped: their errors must stop start-up.
REQUEST_PATH_HOOKS = ("requestheaders", "request", "responseheaders", "response", "error")
_CREDENTIAL_NAMES = (b"authorization", b"x-api-key", b"proxy-authorization")
INTERNAL_ERROR_MESSAGE = (
    "The gateway failed while handling this request: an internal error, described in the "
    "gateway's log."
)


def guard_hooks(addons: list, state: GatewayState) -> list:
    """Wrap the request-path hooks of `addons` (and their child addons) in place."""
    for addon in traverse(addons):
        for name in REQUEST_PATH_HOOKS:
            method = getattr(addon, name, None)
            if callable(method) and not getattr(method, "_ccx_guarded", False):
                setattr(addon, name, _guarded(name, method, state))
    return addons


def _guarded(hook: str, method, state: GatewayState):
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def guarded(flow):
            try:
                return await method(flow)
            except Exception as e:  # noqa: BLE001 (CancelledError is not an Exception)
                fail_closed(hook, method, flow, e, state)
    else:
        @functools.wraps(method)
        def guarded(flow):
            try:
                return method(flow)
            except Exception as e:  # noqa: BLE001
                fail_closed(hook, method, flow, e, state)
    guarded._ccx_guarded = True
    return guarded


def fail_closed(hook: str, method, flow, error: Exception, state: GatewayState) -> None:
    """Answer `flow` for a hook that raised, and log its traceback once (keys scrubbed)."""
    if not isinstance(flow, http.HTTPFlow):
        _log(hook, method, flow, error, state)
        return
    _mask_credentials(flow.request)
    status, message, code, param = _answer_for(error)
    record = state.records.get(flow)
    if record is None:
        record = state.records[flow] = FlowRecord(endpoint="error")
    record.rejected = record.rejected or code
    if isinstance(error, RequestRefused):
        logger.info(f"ccx-addon: refused {_request_line(flow, state)}: {message}")
    else:
        _log(hook, method, flow, error, state)
    if hook in ("requestheaders", "request"):
        if record.handover_token and state.handover is not None:
            state.handover.cancel(record.handover_token)  # this answer replaces the stream
            record.handover_token = ""
        flow.request.stream = False  # a response and a streamed request cannot go together
        flow.response = error_response(
            status, message, "invalid_request_error" if status < 500 else "server_error", code, param,
        )
    elif hook == "responseheaders" and flow.response is not None:
        # The body still to come would overwrite a replaced response: stream it away and
        # send the error's body instead.
        answer = error_response(status, message, "server_error", code, param)
        answer.stream = _ReplaceBody(answer.raw_content)
        flow.response = answer
    elif hook == "response" and flow.response is not None and not flow.response.stream:
        flow.response = error_response(status, message, "server_error", code, param)
    # "error": the client is gone or already answered; the log is all there is to do.


def _answer_for(error: Exception) -> tuple[int, str, str, str | None]:
    if isinstance(error, RequestRefused):
        return error.status, error.message, error.code, error.param
    return 500, INTERNAL_ERROR_MESSAGE, "gateway_internal_error", None


class _ReplaceBody:
    """A response stream callable that sends `body` once and drops what the server sends."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, chunk: bytes) -> bytes:
        body, self.body = self.body, b""
        return body


def _mask_credentials(request: http.Request) -> None:
    """Mask the client's key even if the hook that masks it is the one that failed."""
    fields = request.headers.fields
    if any(name.lower() in _CREDENTIAL_NAMES for name, _ in fields):
        request.headers.fields = tuple(
            (name, SECRET_MASK.encode() if name.lower() in _CREDENTIAL_NAMES else value)
            for name, value in fields
        )


def _log(hook: str, method, flow, error: Exception, state: GatewayState) -> None:
    where = getattr(method, "__qualname__", hook)
    text = _scrubbed("".join(traceback.format_exception(error)), state)
    logger.error(f"ccx-addon: {where} failed on {_request_line(flow, state)}; answered with an error:\n{text.rstrip()}")


def _request_line(flow, state: GatewayState) -> str:
    request = getattr(flow, "request", None)
    return _scrubbed(f"{request.method} {request.path!r}" if request is not None else repr(flow), state)


def _scrubbed(text: str, state: GatewayState) -> str:
    """`text` without any key the config holds (a path or an exception may quote one)."""
    return state.scrub(text.encode("utf-8", "backslashreplace")).decode("utf-8", "replace")

