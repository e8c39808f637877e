"""The front door: masks credentials, checks the path and the proxy access key, and serves
the endpoints that need no upstream (`/health`, `/v1/models`)."""

import hmac
import json
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

from .errors import Endpoint, error_response, json_response, resolve_endpoint
from .routing import listed_models, plan_routes
from .state import SECRET_MASK, FlowRecord, GatewayState

CREDENTIAL_HEADERS = ("authorization", "x-api-key", "proxy-authorization")

WRONG_KEY_HINT = (
    "Use the gateway's proxy access key (PROXY_ACCESS_KEY, or proxy_access_keys in its "
    "config) as your client's API key, not a provider key."
)


def presented_key(headers: http.Headers) -> str | None:
    """The client's key: `x-api-key`, else `Authorization: Bearer`."""
    if value := headers.get("x-api-key"):
        return value.strip()
    auth = headers.get("authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_is_valid(presented: str | None, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison against every accepted key (no early exit)."""
    given = (presented or "").encode()
    valid = False
    for key in accepted:
        valid |= hmac.compare_digest(given, key.encode())
    return valid and presented is not None


def mask_credentials(headers: http.Headers) -> None:
    for name in CREDENTIAL_HEADERS:
        if name in headers:
            value = headers[name]
            scheme, sep, _ = value.partition(" ")
            keep_scheme = name != "x-api-key" and sep and scheme.lower() in ("bearer", "basic")
            headers[name] = f"{scheme} {SECRET_MASK}" if keep_scheme else SECRET_MASK


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


class AccessGate:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.max_body_size = 50 * 1024 * 1024

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_max_body_size", str, "50m",
            "ccx-addon: largest accepted request body (e.g. 50m, 512k); larger ones get 413.",
        )

    def configure(self, updated) -> None:
        if "ccx_max_body_size" in updated:
            try:
                self.max_body_size = human.parse_size(ctx.options.ccx_max_body_size)
            except ValueError as e:
                raise exceptions.OptionsError(f"ccx_max_body_size: {e}") from None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or flow in self.state.records:  # a replay (replay.py)
            return
        # First, before anything can show or log the flow.
        presented = presented_key(flow.request.headers)
        mask_credentials(flow.request.headers)

        record = FlowRecord()
        self.state.records[flow] = record
        endpoint = resolve_endpoint(flow.request.method, flow.request.path, gateway_address(flow))
        record.endpoint = endpoint.name or "error"
        if endpoint.name is None:
            reject(flow, record, endpoint.status, endpoint.message, endpoint.code,
                   headers={"allow": endpoint.allow} if endpoint.allow else None)
        elif endpoint.name == "health":
            self.answer(flow, self.health_payload())
        elif not key_is_valid(presented, self.state.config.proxy_access_keys):
            message = ("No API key given. " if presented is None else "Invalid proxy access key. ") + WRONG_KEY_HINT
            reject(flow, record, 401, message, "invalid_api_key",
                   headers={"www-authenticate": 'Bearer realm="ccx-addon"'})
        elif endpoint.name in ("models", "model"):
            self.serve_models(flow, record, endpoint)
        elif (length := flow.request.headers.get("content-length", "")).isdigit() and int(length) > self.max_body_size:
            self.reject_too_large(flow, record)

    def request(self, flow: http.HTTPFlow) -> None:
        # Bodies without Content-Length (chunked) are only known whole here.
        record = self.state.records.get(flow)
        if record and not flow.response and len(flow.request.raw_content or b"") > self.max_body_size:
            self.reject_too_large(flow, record)

    def response(self, flow: http.HTTPFlow) -> None:
        # mitmproxy sends an addon-made body even to HEAD, and the client then reads that
        # body as the next response on the connection. Keep the length, drop the body.
        if flow.request.method.upper() == "HEAD" and flow.response and flow.response.raw_content:
            length = len(flow.response.raw_content)
            flow.response.raw_content = b""
            flow.response.headers["content-length"] = str(length)

    def reject_too_large(self, flow: http.HTTPFlow, record: FlowRecord) -> None:
        reject(
            flow, record, 413,
            f"The request body is larger than the gateway's limit of "
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
            data = [self.model_object(name) for name in listed_models(config)]
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


def model_not_found_message(model: str, skipped: str) -> str:
    return (
        f"The model {model!r} is not served by any channel of this gateway. "
        f"Each channel's supported_models is checked against the requested name and the "
        f"name it maps to. {('Skipped: ' + skipped + '.') if skipped else 'No channel is configured.'}"
    )
