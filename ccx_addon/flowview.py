"""The flow view as the request log: each flow says which channel, which upstream model and
which attempt served it, keeps its streamed body, and shows the upstream URL."""

import itertools
import logging
import time

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

# The comment, its marker and the summary line are built in flowsummary (pure code).
from .flowsummary import (
    TimedStreamCapture, Timing, client_aborted, comment_for, judge, measure, session_label, summary_line,
)
from .config import url_without_credentials
from .errors import display_text
from .gateway import client_gone, header_value
from .handover import TOKEN_HEADER
from .redact import scrub_text
from .sse import find_usage
from .state import FlowRecord, GatewayState

logger = logging.getLogger(__name__)

# A request header added to the flow view only (after the upstream request was sent): the
# flow shows the request as sent upstream, so this keeps the client's model next to it.
REQUESTED_MODEL_HEADER = "x-ccx-requested-model"
# The metadata keeps this many of the client's headers: more are refused (431) anyway, and
# copying 20,000 of them cost ~50 ms of the gateway's single thread.
KEPT_CLIENT_HEADERS = 200


def describe(record: FlowRecord, status: int | None, error: str = "") -> tuple[str, str]:
    """(comment, marker) for a flow, without timing: one line a user can read and filter
    with ~comment."""
    verdict = judge(record, status, error)
    comment = comment_for(verdict, record.endpoint, session=record.session, stream=record.stream)
    return comment, verdict.marker if verdict else ""


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

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Runs after AccessGate masked the credentials; later hooks rewrite the flow to show
        # the upstream request, so keep the client's here.
        record = self.state.records.get(flow)
        if record is None or record.client_request:
            return
        record.session = session_label(flow.request.headers)
        secrets = self.state.config.secrets if self.state.config else ()
        # items(multi=True): one pass. items() looks every name up again, which made
        # 20,000 headers cost ~20 s of the whole gateway's time (quadratic).
        headers: dict[str, str] = {}
        for name, value in itertools.islice(flow.request.headers.items(multi=True), KEPT_CLIENT_HEADERS):
            name, value = display_text(name), display_text(scrub_text(value, secrets))
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        record.client_request = {
            "method": flow.request.method,
            "path": scrub_text(flow.request.path, secrets),
            "headers": headers,
        }

    def request(self, flow: http.HTTPFlow) -> None:
        # Runs after the gateway decided (and sent the upstream request).
        record = self.state.records.get(flow)
        if record is None:
            return
        if record.requested_model:
            record.client_request.update(model=record.requested_model, stream=record.stream)
            if record.endpoint == "chat" and not record.rejected:
                # The flow's request goes on to the hand-over: no raw CR LF or surrogates.
                flow.request.headers[REQUESTED_MODEL_HEADER] = header_value(record.requested_model)
        if record.result is not None and flow.response is None:
            # Say where the flow is going while it is in flight.
            flow.comment, _ = describe(record, record.result.status)
        if flow.response is not None:
            show_client_url(flow, record)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None or not record.handover_token:
            return
        # Show the upstream, not the loopback hand-over the bytes really come from.
        flow.request.url = record.result.upstream_url  # mitmproxy's URL parse drops userinfo
        flow.request.headers.pop(TOKEN_HEADER, None)
        record.capture = TimedStreamCapture(self.body_limit)
        flow.response.stream = record.capture

    def response(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None:
            return
        show_client_url(flow, record)
        if record.capture is not None:
            flow.response.raw_content = bytes(record.capture.kept)
        self.annotate(flow, record, flow.response.status_code)

    def error(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None:
            return
        message = flow.error.msg if flow.error else "error"
        if record.handover_token and record.stream_failure is None and client_gone(flow):
            # The hand-over notices a moment later (and cancels the upstream then); the
            # flow is annotated now.
            record.stream_failure = "client disconnected mid-stream"
        show_client_url(flow, record)
        if client_aborted(record):
            message = ""  # the verdict says it; mitmproxy's own words would repeat it
        if flow.response is not None:
            # Keep what was streamed before the break (bounded); a response without any
            # content makes mitmweb's content endpoint fail (HTTP 500, TypeError).
            kept = bytes(record.capture.kept) if record.capture is not None else b""
            if flow.response.raw_content is None:
                flow.response.raw_content = kept
            flow.response.timestamp_end = flow.response.timestamp_end or time.time()
        self.annotate(flow, record, flow.response.status_code if flow.response else None, message)

    def annotate(self, flow: http.HTTPFlow, record: FlowRecord, status: int | None, error: str = "") -> None:
        verdict = judge(record, status, error)
        timing = usage = None
        if record.endpoint == "chat" and record.result is not None:
            timing = measure(record, flow)
            usage = usage_of(record, flow)
        flow.comment = display_text(comment_for(verdict, record.endpoint, timing, usage, record.session, record.stream,
                                                links_text(record), record.replay_of))
        if verdict is not None and (verdict.marker or record.replay_of):  # a replay's own verdict
            flow.marked = verdict.marker
        flow.metadata["ccx"] = {"flow_id": flow.id, **self.metadata(record, status, timing, usage)}
        if verdict is not None:
            method = record.client_request.get("method", flow.request.method)
            path = record.client_request.get("path", flow.request.path)
            line = summary_line(method, path, flow.comment)
            # Failures stand out in mitmdump's output (warnings are coloured).
            (logger.warning if verdict.failed else logger.info)(line)

    @staticmethod
    def metadata(record: FlowRecord, status: int | None, timing: Timing | None = None, usage: dict | None = None) -> dict:
        """Plain, non-secret facts saved with the flow (`-w`) for later analysis."""
        result = record.result
        data = {
            "requested_model": record.requested_model,
            "stream": record.stream,
            "status": status,
            "rejected": record.rejected or None,
            "client_request": record.client_request,
            "session": record.session or None,
        }
        if timing is not None:
            data.update(timing.as_metadata())
        if usage:
            data["usage"] = usage
        if result is not None:
            data.update(
                channel=result.route.channel.name if result.route else None,
                upstream_model=display_text(result.route.upstream_model) if result.route else None,
                key=result.key_label or None,
                attempts=[
                    {"channel": a.channel, "key": a.key, "model": a.upstream_model, "outcome": a.outcome,
                     "ok": a.ok, "url": url_without_credentials(a.url)}
                    for a in result.attempts
                ],
                stream_failure=record.stream_failure,
            )
        if record.attempt_flows:
            data["attempt_flows"] = list(record.attempt_flows)
        if record.replay_of:
            data["replay_of"] = record.replay_of
        return data


def answered_locally(record: FlowRecord) -> bool:
    """The gateway answered without an upstream: refusals, its own endpoints, errors made
    before or instead of an upstream answer, echo."""
    result = record.result
    return (record.rejected != "" or record.endpoint != "chat" or result is None or result.route is None
            or result.route.channel.is_echo)


def client_url(flow: http.HTTPFlow) -> tuple[str, str, int] | None:
    """(scheme, host, port) the client connected to: the listen address, not the reverse
    mode's placeholder target (`http://127.0.0.1:9`) the request still names."""
    sockname = flow.client_conn.sockname
    if not sockname:
        return None
    scheme = "https" if flow.client_conn.tls_established else "http"
    return scheme, sockname[0], sockname[1]


def show_client_url(flow: http.HTTPFlow, record: FlowRecord) -> None:
    """Local answers show the URL the client called (the request path is already real)."""
    if record.replay_of or not answered_locally(record) or (target := client_url(flow)) is None:
        return
    scheme, host, port = target
    if (flow.request.scheme, flow.request.host, flow.request.port) == target:
        return
    flow.request.scheme, flow.request.host, flow.request.port = scheme, host, port
    flow.request.host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def links_text(record: FlowRecord) -> str:
    """The ids of the failed attempts' own flows, so `~comment ID` finds both sides."""
    if not record.attempt_flows:
        return ""
    return "attempt flows " + " ".join(i[:8] for i in record.attempt_flows)


def usage_of(record: FlowRecord, flow: http.HTTPFlow) -> dict | None:
    """The answer's `usage`: from the body the flow keeps, else from the end of the stream
    (kept apart, for streams longer than ccx_stream_body_limit)."""
    usage = find_usage(flow.response.raw_content or b"") if flow.response else None
    if usage is None and isinstance(record.capture, TimedStreamCapture):
        usage = find_usage(record.capture.tail)
    return usage or record.removed_usage
