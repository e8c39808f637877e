"""Bounded flow memory: mitmweb (and mitmproxy's console) keep every flow's bodies for as
long as the flow is listed. Measured before this addon: 30 requests of 20 MB took mitmweb
from 89 MB to 827 MB RSS, for good, and `ccx_keep_flows=1000` at the 50 MB body limit
allowed ~50 GB. Once a flow is finished (its client has the whole answer), this addon
cuts each of its bodies to `ccx_flow_body_limit` and keeps the bodies of all listed flows
under `ccx_flows_memory` in total, cutting the oldest first. A cut says so in the flow: an
`x-ccx-body-cut` header on the message, e.g. "kept 1048576 of 20971520 bytes".
Flows written with `-w` are saved whole before any cut.
"""

import asyncio
import ctypes
import ctypes.util
import logging
import weakref

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import human

from .state import GatewayState

logger = logging.getLogger(__name__)

CUT_HEADER = "x-ccx-body-cut"
# A flow still sending its answer is checked again this often, for at most this long.
_SETTLE_INTERVAL = 0.05
_SETTLE_CHECKS = 1200


def cut_note(kept: int, total: int, why: str) -> str:
    return f"kept {kept} of {total} bytes ({why})"


def cut_message(message: http.Message, limit: int, why: str) -> int:
    """Cut `message`'s body to `limit` bytes, noting the cut in a header. Returns the bytes
    freed."""
    body = message.raw_content
    if body is None or len(body) <= limit:
        return 0
    if CUT_HEADER not in message.headers:
        message.headers[CUT_HEADER] = cut_note(limit, len(body), why)
    else:  # cut before: keep the first note's total
        total = message.headers[CUT_HEADER].split(" of ", 1)[1].split(" ", 1)[0]
        message.headers[CUT_HEADER] = cut_note(limit, int(total), why)
    message.raw_content = body[:limit]
    return len(body) - limit


def body_bytes(flow: http.HTTPFlow) -> int:
    return sum(len(m.raw_content or b"") for m in (flow.request, flow.response) if m is not None)


def oldest_over_budget(sizes: list[tuple[object, int]], budget: int) -> list[object]:
    """The oldest entries (`sizes` oldest first) to empty so the rest fit in `budget`."""
    total = sum(size for _, size in sizes)
    chosen = []
    for item, size in sizes:
        if total <= budget:
            break
        if size:
            chosen.append(item)
            total -= size
    return chosen


class FlowMemory:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.body_limit = 1024 * 1024
        self.total_limit = 256 * 1024 * 1024
        # Finished flows still alive, oldest first: flow id -> (weak flow, body bytes kept).
        # An entry goes when its flow is freed (removed from the list, or mitmdump done).
        self.kept: dict[str, tuple[weakref.ref, int]] = {}
        self.total = 0
        self._malloc_trim = _find_malloc_trim()

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_flow_body_limit", str, "1m",
            "ccx-addon: how much of each request and response body a finished flow keeps in "
            "memory for the flow view (mitmweb, the console); the rest is cut, noted in an "
            "x-ccx-body-cut header. The client always gets the whole answer; -w saves it whole.",
        )
        loader.add_option(
            "ccx_flows_memory", str, "256m",
            "ccx-addon: the most body bytes all listed flows keep together; beyond it the "
            "oldest flows' bodies are cut (x-ccx-body-cut header).",
        )

    def configure(self, updated) -> None:
        for name in ("ccx_flow_body_limit", "ccx_flows_memory"):
            if name in updated:
                try:
                    size = human.parse_size(getattr(ctx.options, name))
                except ValueError as e:
                    raise exceptions.OptionsError(f"{name}: {e}") from None
                if size is None or size < 0:
                    raise exceptions.OptionsError(f"{name}: must be a size such as 1m or 512k")
                if name == "ccx_flow_body_limit":
                    self.body_limit = size
                else:
                    self.total_limit = size

    def response(self, flow: http.HTTPFlow) -> None:
        self._when_finished(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._when_finished(flow)

    def _when_finished(self, flow: http.HTTPFlow, checks: int = 0) -> None:
        """Cut once mitmproxy has sent the answer: the `response` hook runs before that."""
        if flow.live and checks < _SETTLE_CHECKS:
            asyncio.get_running_loop().call_later(_SETTLE_INTERVAL, self._when_finished, flow, checks + 1)
            return
        if flow.live:
            return  # still sending after a minute: the total budget catches it later
        self.settle(flow)

    def settle(self, flow: http.HTTPFlow) -> None:
        freed = self.release_record(flow)
        for message in (flow.request, flow.response):
            if message is not None:
                freed += cut_message(message, self.body_limit, "ccx_flow_body_limit")
        self.remember(flow)
        freed += self.enforce_total()
        if freed >= 8 * 1024 * 1024 and self._malloc_trim:
            # Large freed bodies stay in the C heap otherwise (glibc raises its mmap
            # threshold after the first big free): hand them back to the system.
            self._malloc_trim(0)

    def release_record(self, flow: http.HTTPFlow) -> int:
        """Drop the gateway's own copies of the bodies (the request as sent upstream, the
        buffered answer, the stream capture): the flow has what it shows."""
        record = self.state.records.get(flow)
        result = record.result if record is not None else None
        if result is None:
            return 0
        freed = len(result.sent_body or b"") if result.sent_body is not flow.request.raw_content else 0
        result.sent_body = b""
        result.body = None
        record.capture = None
        for attempt in result.attempts:  # attempt flows (attemptflows.py) were built already
            attempt.sent_body, attempt.body = b"", b""
        return freed

    def remember(self, flow: http.HTTPFlow) -> None:
        self.forget(flow.id)
        size = body_bytes(flow)
        self.kept[flow.id] = (weakref.ref(flow, lambda _, flow_id=flow.id: self.forget(flow_id)), size)
        self.total += size

    def forget(self, flow_id: str) -> None:
        if (entry := self.kept.pop(flow_id, None)) is not None:
            self.total -= entry[1]

    def enforce_total(self) -> int:
        """Cut the oldest flows' bodies until all fit in `ccx_flows_memory`."""
        if self.total <= self.total_limit:
            return 0
        sizes = [(flow, size) for ref, size in self.kept.values() if (flow := ref()) is not None]
        freed = 0
        for flow in oldest_over_budget(sizes, self.total_limit):
            for message in (flow.request, flow.response):
                if message is not None:
                    freed += cut_message(message, 0, "ccx_flows_memory")
            ref, size = self.kept[flow.id]
            self.kept[flow.id] = (ref, 0)  # in place: the flow stays among the oldest
            self.total -= size
        return freed


def _find_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc: nothing to trim
