"""Failed upstream attempts as flows of their own in mitmweb's list: the URL, the
upstream's real status, headers (keys masked), body (scrubbed, bounded) and timing, linked
both ways with the flow that served the client. mitmdump has no flow list: nothing to do
there."""

from mitmproxy import ctx
from mitmproxy import flow as mflow
from mitmproxy import http

from .flowsummary import MARK_ATTEMPT, short_outcome
from .forwarding import Attempt
from .state import SECRET_MASK, FlowRecord, GatewayState
from .upstream import upstream_request_headers

# The words that find (or, negated, hide) every attempt flow: `!~comment "attempt:"`.
ATTEMPT_WORD = "attempt:"


def failed_attempts(record: FlowRecord) -> list[tuple[int, Attempt]]:
    """(number, attempt) of the attempts that sent a request and did not serve the client."""
    result = record.result
    if result is None:
        return []
    numbered = [(i, a) for i, a in enumerate((a for a in result.attempts if not a.skipped), 1)]
    if result.route is not None and numbered:
        numbered = numbered[:-1]  # the last one is what the served flow shows
    return [(i, a) for i, a in numbered if a.url]


def attempt_comment(number: int, attempt: Attempt, served_id: str, requested_model: str) -> str:
    """`↯ flaky 503 | attempt: #1 for 1a2b3c4d | gpt-5→up-model | 503 overloaded | 0.01s | key flaky#1`."""
    seconds = f"{max(0.0, attempt.ended - attempt.started):.2f}s" if attempt.ended else ""
    parts = [f"↯ {attempt.channel} {short_outcome(attempt.outcome)}", f"{ATTEMPT_WORD} #{number} for {served_id[:8]}", f"{requested_model}→{attempt.upstream_model}", attempt.outcome, seconds,
             f"key {attempt.key}" if attempt.key not in ("", "-") else ""]
    return " | ".join(p for p in parts if p)


def request_headers(record: FlowRecord, channel) -> http.Headers:
    """The attempt's request headers as sent, the key masked."""
    client = record.client_request.get("headers", {})
    if channel is None:  # reloaded away since
        pairs = [(k, v) for k, v in client.items() if k.lower() not in ("authorization", "x-api-key")]
    else:
        pairs = upstream_request_headers(client.items(), channel, SECRET_MASK).items()
    return _headers(pairs)


def _headers(pairs) -> http.Headers:
    return http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in pairs])


def build_attempt_flow(served: http.HTTPFlow, record: FlowRecord, number: int, attempt: Attempt, channel) -> http.HTTPFlow:
    request = http.Request.make("POST", attempt.url, attempt.sent_body, request_headers(record, channel))
    request.timestamp_start = attempt.started
    request.timestamp_end = attempt.started
    f = http.HTTPFlow(served.client_conn, served.server_conn)
    f.request = request
    if attempt.status is not None:
        f.response = http.Response.make(attempt.status, attempt.body, _headers(attempt.headers))
        f.response.reason = attempt.reason
        f.response.timestamp_start = attempt.ended
        f.response.timestamp_end = attempt.ended
    else:
        f.error = mflow.Error(attempt.outcome, timestamp=attempt.ended or attempt.started)
    f.live = False
    f.marked = MARK_ATTEMPT
    f.comment = attempt_comment(number, attempt, served.id, record.requested_model)
    f.metadata["ccx"] = {
        "attempt_of": served.id, "attempt": number, "channel": attempt.channel, "key": attempt.key,
        "upstream_model": attempt.upstream_model, "outcome": attempt.outcome,
        "duration_ms": round((attempt.ended - attempt.started) * 1000) if attempt.ended else None,
    }
    return f


class AttemptFlows:
    """After the gateway forwarded a request (its `request` hook), adds one flow per failed
    attempt to mitmweb's (or mitmproxy's) flow list. They are plain flows in the view, so
    `ccx_keep_flows` bounds them like the rest."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def request(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None or record.attempt_flows or not (attempts := failed_attempts(record)):
            return
        view = ctx.master.addons.get("view")
        if view is None:
            return  # mitmdump: no flow list
        channels = {c.name: c for c in self.state.config.channels} if self.state.config else {}
        flows = [build_attempt_flow(flow, record, n, a, channels.get(a.channel)) for n, a in attempts]
        record.attempt_flows = [f.id for f in flows]
        view.add(flows)
