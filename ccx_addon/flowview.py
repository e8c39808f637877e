"""The flow view as the request log: each flow says which channel, which upstream model and
which attempt served it, keeps its streamed body, and shows the upstream URL."""

import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

from .handover import TOKEN_HEADER
from .sse import StreamCapture, find_usage
from .state import FlowRecord, GatewayState

logger = logging.getLogger(__name__)

# mitmweb renders these shortcodes as coloured dots in the flow list.
MARK_FAILOVER = ":yellow_circle:"
MARK_REJECTED = ":orange_circle:"
MARK_UPSTREAM_ERROR = ":red_circle:"


def tries_of(record: FlowRecord) -> list:
    if record.result is None:
        return []
    return [a for a in record.result.attempts if not a.outcome.startswith("skipped")]


def describe(record: FlowRecord, status: int | None, error: str = "") -> tuple[str, str]:
    """(comment, marker) for a flow: one line a user can read and filter with ~comment."""
    if record.rejected:
        return f"ccx rejected: {status} {record.rejected}", MARK_REJECTED
    if record.endpoint != "chat":
        return f"ccx local: {record.endpoint}", ""
    result = record.result
    parts = []
    marker = ""
    if result is None:
        if record.client_gone:
            return f"ccx {record.requested_model} | client disconnected before any answer", MARK_UPSTREAM_ERROR
        return f"ccx {record.requested_model} | {error or 'no answer'}", MARK_UPSTREAM_ERROR

    tries = tries_of(record)
    earlier = [a for a in result.attempts[:-1]] if result.route else result.attempts
    why = "; ".join(f"{a.channel} ({a.key}): {a.outcome}" for a in earlier)
    if result.route is not None:
        route = result.route
        parts.append(f"ccx {route.channel.name} ({result.key_label})")
        parts.append(f"{record.requested_model} → {route.upstream_model}")
        parts.append(f"attempt {len(tries)}/{max(len(tries), result.candidates)}" + (f" after {why}" if why else ""))
    else:
        parts.append("ccx failed")
        parts.append(record.requested_model)
        parts.append(f"tried {why}")
    parts.append(str(status if status is not None else result.status) + (" stream" if record.stream else ""))
    if error:
        parts.append(error)
    if record.stream_failure:
        parts.append(f"stream ended early: {record.stream_failure}")

    if error or record.stream_failure or not result.ok:
        marker = MARK_UPSTREAM_ERROR
    elif result.served_by_failover:
        marker = MARK_FAILOVER
    return " | ".join(parts), marker


def timings(record: FlowRecord, flow: http.HTTPFlow) -> tuple[float | None, float]:
    """(time to first body byte, total duration) in seconds."""
    end = (flow.response.timestamp_end if flow.response and flow.response.timestamp_end else None) or time.time()
    first = None
    if record.capture and record.capture.first_chunk_at:
        first = record.capture.first_chunk_at - record.started
    elif flow.response and flow.response.timestamp_start:
        first = flow.response.timestamp_start - record.started
    return first, end - record.started


class FlowView:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.body_limit = 1024 * 1024

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_stream_body_limit", str, "1m",
            "ccx-addon: how much of each streamed response body to keep on the flow for the "
            "flow view (mitmproxy does not store streamed bodies itself).",
        )

    def configure(self, updated) -> None:
        if "ccx_stream_body_limit" in updated:
            try:
                self.body_limit = human.parse_size(ctx.options.ccx_stream_body_limit)
            except ValueError as e:
                raise exceptions.OptionsError(f"ccx_stream_body_limit: {e}") from None

    def request(self, flow: http.HTTPFlow) -> None:
        # Runs after the gateway decided: say where the flow is going while it is in flight.
        record = self.state.records.get(flow)
        if record is not None and record.result is not None and flow.response is None:
            flow.comment, _ = describe(record, record.result.status)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None or not record.handover_token:
            return
        # Show the upstream, not the loopback hand-over the bytes really come from.
        flow.request.url = record.result.upstream_url
        flow.request.headers.pop(TOKEN_HEADER, None)
        record.capture = StreamCapture(self.body_limit)
        flow.response.stream = record.capture

    def response(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None:
            return
        if record.capture is not None:
            flow.response.raw_content = bytes(record.capture.kept)
        self.annotate(flow, record, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is not None:
            message = flow.error.msg if flow.error else "error"
            if record.client_gone:
                message = "client disconnected before the answer; upstream request cancelled"
            self.annotate(flow, record, flow.response.status_code if flow.response else None, message)

    def annotate(self, flow: http.HTTPFlow, record: FlowRecord, status: int | None, error: str = "") -> None:
        comment, marker = describe(record, status, error)
        if record.endpoint == "chat" and record.result is not None:
            first, total = timings(record, flow)
            usage = find_usage(flow.response.raw_content or b"") if flow.response else None
            extra = [f"ttfb {first * 1000:.0f}ms" if first is not None else "", f"{total:.2f}s"]
            if usage:
                extra.append(f"tokens {usage.get('prompt_tokens', '?')}/{usage.get('completion_tokens', '?')}")
            comment += " | " + " ".join(e for e in extra if e)
        flow.comment = comment
        if marker:
            flow.marked = marker
        flow.metadata["ccx"] = self.metadata(record, status)
        if record.endpoint == "chat":
            logger.info(f"{flow.request.method} {record.requested_model or '-'}: {comment}")

    @staticmethod
    def metadata(record: FlowRecord, status: int | None) -> dict:
        """Plain, non-secret facts saved with the flow (`-w`) for later analysis."""
        result = record.result
        data = {
            "requested_model": record.requested_model,
            "stream": record.stream,
            "status": status,
            "rejected": record.rejected or None,
        }
        if result is not None:
            data.update(
                channel=result.route.channel.name if result.route else None,
                upstream_model=result.route.upstream_model if result.route else None,
                key=result.key_label or None,
                attempts=[
                    {"channel": a.channel, "key": a.key, "model": a.upstream_model, "outcome": a.outcome}
                    for a in result.attempts
                ],
                stream_failure=record.stream_failure,
            )
        return data
