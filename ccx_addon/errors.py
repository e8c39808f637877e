"""Answers the gateway makes itself, in OpenAI's error shape, and the path checks that
explain the usual client misconfigurations (see the seed's troubleshooting list)."""

import dataclasses
import json
import time

from mitmproxy import http

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
HEALTH_PATH = "/health"
STATUS_PATH = "/ccx/status"

OPENAI_COMPATIBLE_HINT = (
    "choose an OpenAI Chat-compatible provider (in OpenCode: npm package "
    "@ai-sdk/openai-compatible) with Base URL {base}"
)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        ensure_ascii=False,
        # A message may quote a method, path or model holding lone surrogates (undecodable
        # bytes, or a JSON "\ud800"): they become JSON escapes instead of an encoding error.
    ).encode("utf-8", "backslashreplace")


def json_response(
    status: int, payload: bytes, headers: dict[str, str] | None = None
) -> http.Response:
    all_headers = {"content-type": "application/json", "x-ccx-gateway": "local"}
    all_headers.update(headers or {})
    response = http.Response.make(status, payload, all_headers)
    response.timestamp_start = response.timestamp_end = time.time()
    return response


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> http.Response:
    return json_response(status, error_body(message, type_, code, param), headers)


class RequestRefused(Exception):
    """Raised anywhere on the request path when the client's input is at fault: the
    fail-closed guard (guard.py) answers it with this status and message."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def display_text(text: str) -> str:
    """`text` safe to log, save (-w) and show: lone surrogates (a JSON "\\ud800" in a model
    name) become backslash escapes instead of crashing an encoder later."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """What a request path resolves to: one of the served endpoints, or an error to send."""

    name: str | None  # "chat", "models", "model", "health"; None for an error
    status: int = 200
    message: str = ""
    code: str = ""
    allow: str = ""


_SERVED = {
    CHAT_PATH: ("chat", "POST"),
    MODELS_PATH: ("models", "GET"),
    HEALTH_PATH: ("health", "GET"),
    STATUS_PATH: ("status", "GET"),  # status.py, behind the proxy key
}

_OTHER_APIS = {
    "/v1/responses": "the OpenAI Responses API",
    "/v1/messages": "the Anthropic Messages API",
    "/v1/messages/count_tokens": "the Anthropic Messages API",
    "/v1/completions": "the legacy Completions API",
    "/v1/embeddings": "the Embeddings API",
}


def resolve_endpoint(method: str, path: str, host: str) -> Endpoint:
    """Decide from method and path alone. `host` (the client's Host header) only shapes hints."""
    path = path.split("?", 1)[0].split("#", 1)[0]
    normalized = "/" + path.strip("/") if path.strip("/") else "/"
    base = f"http://{host or 'localhost:3000'}/v1"

    if normalized in _SERVED:
        name, allowed = _SERVED[normalized]
        if method == allowed or (allowed == "GET" and method == "HEAD"):
            return Endpoint(name)
        return Endpoint(
            None, 405,
            f"{method} is not allowed on {normalized}; use {allowed}. "
            + (f"OpenAI clients send POST {CHAT_PATH} when their Base URL is {base}."
               if name == "chat" else ""),
            "method_not_allowed", allow=allowed,
        )
    if normalized.startswith(MODELS_PATH + "/") and method in ("GET", "HEAD"):
        return Endpoint("model")

    if normalized.endswith("/chat/completions/chat/completions") or (
        normalized.endswith("/chat/completions") and normalized != CHAT_PATH
        and normalized.startswith("/v1/")
    ):
        return _not_found(
            f"{normalized} is not an endpoint of this gateway: the Base URL must be {base}, "
            "not the concrete /chat/completions endpoint (the client appends "
            "/chat/completions itself)."
        )
    if normalized.startswith("/v1/v1/"):
        return _not_found(f"{normalized}: the Base URL ends in /v1 twice; set it to {base}.")
    if normalized in ("/chat/completions", "/models"):
        return _not_found(
            f"{normalized} is missing the /v1 prefix: the Base URL must end in /v1, i.e. {base}."
        )
    if normalized in _OTHER_APIS or normalized in ("/responses", "/messages"):
        api = _OTHER_APIS.get(normalized) or _OTHER_APIS["/v1" + normalized]
        return _not_found(
            f"{normalized} is {api}, which this gateway does not serve: it serves OpenAI Chat "
            f"Completions only ({CHAT_PATH}). In your client, "
            + OPENAI_COMPATIBLE_HINT.format(base=base) + "."
        )
    return _not_found(
        f"Unknown path {method} {normalized}. This gateway serves POST {CHAT_PATH}, "
        f"GET {MODELS_PATH} and GET {HEALTH_PATH}; set your client's Base URL to {base}."
    )


def _not_found(message: str) -> Endpoint:
    return Endpoint(None, 404, message, "unknown_url")
