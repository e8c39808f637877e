"""The front door: masks credentials, checks the path and the proxy access key, and serves
the endpoints that need no upstream (`/health`, `/v1/models`)."""

import hmac
import json
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import http1
from mitmproxy.utils import human

from .errors import Endpoint, RequestRefused, error_response, json_response, resolve_endpoint
from .handover import TOKEN_HEADER
from .requestcheck import bad_header, content_encodings, header_limits
from .routing import listed_models, plan_routes
from .state import SECRET_MASK, FlowRecord, GatewayState

CREDENTIAL_HEADERS = ("authorization", "x-api-key", "proxy-authorization")
_CREDENTIAL_NAMES = frozenset(name.encode() for name in CREDENTIAL_HEADERS)

WRONG_KEY_HINT = (
    "Use the gateway's proxy access key (PROXY_ACCESS_KEY, or proxy_access_keys in its "
    "config) as your client's API key, not a provider key."
)


def _credentials(headers: http.Headers) -> dict[str, str]:
    """The credential headers, each name's values joined as `headers.get` joins them. One
    pass over the fields: a lookup per name scans them all again (20,000 headers)."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in headers.fields:
        if (lower := name.lower()) in _CREDENTIAL_NAMES:
            found.setdefault(lower, []).append(value)
    return {name.decode(): b", ".join(values).decode("utf-8", "surrogateescape") for name, values in found.items()}


def presented_key(headers: http.Headers) -> str | None:
    """The client's key: `x-api-key`, else `Authorization: Bearer`."""
    credentials = _credentials(headers)
    if value := credentials.get("x-api-key"):
        return value.strip()
    scheme, _, token = credentials.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_is_valid(presented: str | None, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted key (no early exit)."""
    given = (presented or "").encode("utf-8", "surrogateescape")
    valid = False
    for key in accepted:
        valid |= hmac.compare_digest(given, key.encode())
    return valid and presented is not None


def mask_credentials(headers: http.Headers) -> None:
    """Every credential header's value replaced by the mask (keeping a Bearer/Basic scheme)."""
    if not _credentials(headers):
        return
    masked = []
    for name, value in headers.fields:
        if (lower := name.lower()) in _CREDENTIAL_NAMES:
            scheme, sep, _ = value.partition(b" ")
            keep_scheme = lower != b"x-api-key" and sep and scheme.lower() in (b"bearer", b"basic")
            value = (scheme + b" " if keep_scheme else b"") + SECRET_MASK.encode()
        masked.append((name, value))
    headers.fields = tuple(masked)


def gateway_address(flow: http.HTTPFlow) -> str:
    """HOST:PORT a client should use, for hints. Not the Host header: reverse mode rewrites
    it to the (placeholder) target."""
    sockname = flow.client_conn.sockname
    if not sockname:
        return "localhost:3000"
    host, port = sockname[0], sockname[1]
    if host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def body_follows(request: http.Request) -> bool:
    """Whether the client sends a body after these headers (Content-Length or chunked)."""
    try:
        size = http1.expected_http_body_size(request)
    except ValueError:
        return False  # mitmproxy refuses such requests itself
    return size is None or size > 0


class AccessGate:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.max_body_size = 50 * 1024 * 1024
        self.max_header_count = 100
        self.max_header_size = 64 * 1024
        self._body_size_limit_set: str | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_max_body_size", str, "50m",
            "ccx-addon: largest accepted request body (e.g. 50m, 512k), also once decompressed; "
            "larger ones get 413. Sets mitmproxy's body_size_limit unless that is set.",
        )
        loader.add_option(
            "ccx_max_header_count", int, 100,
            "ccx-addon: most request headers accepted; more get 431.",
        )
        loader.add_option(
            "ccx_max_header_size", str, "64k",
            "ccx-addon: largest total size of the request headers; larger get 431.",
        )

    def configure(self, updated) -> None:
        if "ccx_max_body_size" in updated:
            try:
                self.max_body_size = self.state.max_body_size = human.parse_size(ctx.options.ccx_max_body_size)
            except ValueError as e:
                raise exceptions.OptionsError(f"ccx_max_body_size: {e}") from None
            if ctx.options.body_size_limit in (None, self._body_size_limit_set):
                # mitmproxy then stops reading a body at the limit (chunked ones too) instead
                # of buffering it whole before the request hook sees its size. A limit the
                # user set is left alone.
                self._body_size_limit_set = ctx.options.ccx_max_body_size
                ctx.options.update(body_size_limit=self._body_size_limit_set)
        if "ccx_max_header_count" in updated:
            if ctx.options.ccx_max_header_count < 1:
                raise exceptions.OptionsError("ccx_max_header_count: must be at least 1")
            self.max_header_count = ctx.options.ccx_max_header_count
        if "ccx_max_header_size" in updated:
            try:
                self.max_header_size = human.parse_size(ctx.options.ccx_max_header_size)
            except ValueError as e:
                raise exceptions.OptionsError(f"ccx_max_header_size: {e}") from None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or flow in self.state.records:  # a replay (replay.py)
            return
        # First, before anything can show or log the flow.
        headers = flow.request.headers
        presented = presented_key(headers)
        mask_credentials(headers)

        record = FlowRecord()
        self.state.records[flow] = record
        record.close_connection = http1.connection_close(flow.request.http_version, headers)
        endpoint = resolve_endpoint(flow.request.method, flow.request.path, gateway_address(flow))
        record.endpoint = endpoint.name or "error"
        fields = headers.fields
        if refused := header_limits(fields, self.max_header_count, self.max_header_size) or bad_header(fields):
            self.refuse(flow, record, refused)
        elif endpoint.name is None:
            self.refuse(flow, record, RequestRefused(endpoint.status, endpoint.message, endpoint.code),
                        headers={"allow": endpoint.allow} if endpoint.allow else None)
        elif endpoint.name == "health":
            valid = key_is_valid(presented, self.state.config.proxy_access_keys)
            # Channel names, key labels and breaker states are for the key holder only.
            self.answer(flow, self.health_payload() if valid else {"status": "ok"})
        elif not key_is_valid(presented, self.state.config.proxy_access_keys):
            message = ("No API key given. " if presented is None else "Invalid proxy access key. ") + WRONG_KEY_HINT
            self.refuse(flow, record, RequestRefused(401, message, "invalid_api_key"),
                        headers={"www-authenticate": 'Bearer realm="ccx-addon"'})
        elif endpoint.name in ("models", "model"):
            self.serve_models(flow, record, endpoint)
        elif (length := headers.get("content-length", "")).isdigit() and int(length) > self.max_body_size:
            self.refuse(flow, record, self.too_large())
        else:
            try:
                content_encodings(headers.get("content-encoding", ""))
            except RequestRefused as e:
                self.refuse(flow, record, e)

    def request(self, flow: http.HTTPFlow) -> None:
        # Bodies without Content-Length (chunked) are only known whole here.
        record = self.state.records.get(flow)
        if record and not flow.response and not record.answered_early and len(flow.request.raw_content or b"") > self.max_body_size:
            reject(flow, record, 413, self.too_large().message, "request_too_large")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None or flow.response is None:
            return
        if record.answered_early:
            # Show what the client sent and where, not what went to the hand-over.
            scheme, host, port, fields = record.answered_early
            flow.request.scheme, flow.request.host, flow.request.port = scheme, host, port
            flow.request.headers.fields = fields
            flow.request.raw_content = b""  # dropped unread; None would break mitmweb's view
        response_headers = flow.response.headers
        if flow.request.http_version == "HTTP/1.0" and "transfer-encoding" in response_headers:
            # An HTTP/1.0 client knows no chunked encoding: the body ends when the connection does.
            del response_headers["transfer-encoding"]
            record.close_connection = True
        if record.close_connection:
            response_headers["connection"] = "close"

    def response(self, flow: http.HTTPFlow) -> None:
        # mitmproxy sends an addon-made body even to HEAD, and the client then reads that
        # body as the next response on the connection. Keep the length, drop the body.
        if flow.request.method.upper() == "HEAD" and flow.response and flow.response.raw_content:
            length = len(flow.response.raw_content)
            flow.response.raw_content = b""
            flow.response.headers["content-length"] = str(length)

    def refuse(self, flow: http.HTTPFlow, record: FlowRecord, refusal: RequestRefused,
               headers: dict[str, str] | None = None) -> None:
        """Answer from the headers alone. With a body still to come, EarlyAnswers sends the
        answer without waiting for the body (mitmproxy sends a response set here only once
        it has read the whole body: an unauthenticated 300 MB POST was read whole)."""
        reject(flow, record, refusal.status, refusal.message, refusal.code, refusal.param, headers)
        handover = self.state.handover
        if body_follows(flow.request) and handover is not None and handover.port:
            record.answered_early = (flow.request.scheme, flow.request.host, flow.request.port, flow.request.headers.fields)

    def too_large(self) -> RequestRefused:
        return RequestRefused(
            413, f"The request body is larger than the gateway's limit of "
            f"{human.pretty_size(self.max_body_size)} (option ccx_max_body_size).",
            "request_too_large",
        )

    @staticmethod
    def answer(flow: http.HTTPFlow, payload: dict) -> None:
        flow.response = json_response(200, json.dumps(payload).encode())

    def health_payload(self) -> dict:
        config, health = self.state.config, self.state.health
        now = time.time()
        snapshot = health.snapshot(now)
        channels = {}
        for channel in config.channels:
            channels[channel.name] = {
                "active": channel.active,
                **({"inactive": channel.inactive_reason or "disabled"} if not channel.active else {}),
                **snapshot[channel.name],
            }
        serving = any(c.active and snapshot[c.name]["circuit"] != "open" for c in config.channels)
        return {"status": "ok" if serving else "degraded", "channels": channels}

    def serve_models(self, flow: http.HTTPFlow, record: FlowRecord, endpoint: Endpoint) -> None:
        config = self.state.config
        if endpoint.name == "models":
            data = [self.model_object(name) for name in listed_models(config, self.state.upstream_models)]
            self.answer(flow, {"object": "list", "data": data})
            return
        model = flow.request.path.split("?", 1)[0].rstrip("/").split("/v1/models/", 1)[1]
        plan = plan_routes(config, model)
        if plan.routes:
            self.answer(flow, self.model_object(model, plan.routes[0].channel.name))
        else:
            reject(flow, record, 404, model_not_found_message(model, plan.describe_skipped()),
                   "model_not_found")

    def model_object(self, name: str, owner: str | None = None) -> dict:
        if owner is None:
            plan = plan_routes(self.state.config, name)
            owner = plan.routes[0].channel.name if plan.routes else "ccx-addon"
        return {"id": name, "object": "model", "created": 0, "owned_by": owner}


def reject(flow: http.HTTPFlow, record: FlowRecord, status: int, message: str, code: str,
           param: str | None = None, headers: dict[str, str] | None = None) -> None:
    """Answer the request from the gateway with an OpenAI-shaped `invalid_request_error`."""
    record.rejected = code
    flow.response = error_response(status, message, "invalid_request_error", code, param, headers)


class EarlyAnswers:
    """Sends the answers AccessGate decided from the headers of a request whose body is still
    to come, without reading that body into memory: the answer is served by the loopback
    hand-over server while mitmproxy streams the body away (`drop_body`). Runs after every
    other `requestheaders` hook, so the flow view has copied the client's request by then."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None or not record.answered_early or flow.response is None:
            return
        handover = self.state.handover
        token = handover.register_answer(http1.assemble_response(flow.response))
        flow.response = None
        flow.request.stream = drop_body
        flow.request.scheme, flow.request.host, flow.request.port = "http", "127.0.0.1", handover.port
        # The hand-over needs the token only: the client's headers may be many (a 431).
        flow.request.headers = http.Headers([(TOKEN_HEADER.encode(), token.encode()), (b"content-length", b"0")])


def drop_body(chunk: bytes) -> list[bytes]:
    """The request stream of a refused request: nothing goes on, nothing is kept."""
    return []


def model_not_found_message(model: str, skipped: str) -> str:
    return (
        f"The model {model!r} is not served by any channel of this gateway. "
        f"Each channel's supported_models is checked against the requested name and the "
        f"name it maps to. {('Skipped: ' + skipped + '.') if skipped else 'No channel is configured.'}"
    )
