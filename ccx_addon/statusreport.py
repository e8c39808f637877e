"""The gateway's status: per channel its keys (ready / cooling until / disabled because),
its circuit breaker, and what it served since start (requests, failures, tokens, p50 time
to first token). Pure: counting and the table, for `ccx.status` and `ccx-addon status`."""

import collections
import dataclasses
import statistics
import time

# Time-to-first-token samples kept per channel for the median (a bounded window).
TTFT_SAMPLES = 1000


@dataclasses.dataclass
class ChannelCounts:
    requests: int = 0  # upstream requests sent (every attempt)
    failures: int = 0  # of which failed
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_ms: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=TTFT_SAMPLES))

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "failures": self.failures, "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "ttft_p50_ms": round(statistics.median(self.ttft_ms)) if self.ttft_ms else None,
        }


class Counters:
    """What each channel did since start, from the flow view's metadata of each request."""

    def __init__(self) -> None:
        self.started = time.time()
        self.channels: dict[str, ChannelCounts] = collections.defaultdict(ChannelCounts)

    def count(self, meta: dict) -> None:
        for attempt in meta.get("attempts") or ():
            if str(attempt.get("outcome", "")).startswith("skipped"):
                continue
            counts = self.channels[attempt["channel"]]
            counts.requests += 1
            counts.failures += 0 if attempt.get("ok") else 1
        channel = meta.get("channel")
        if not channel:
            return
        counts = self.channels[channel]
        usage = meta.get("usage") or {}
        counts.tokens_in += _int(usage.get("prompt_tokens"))
        counts.tokens_out += _int(usage.get("completion_tokens"))
        first = meta.get("ttft_ms") if meta.get("stream") else meta.get("ttfb_ms")
        if isinstance(first, (int, float)) and meta.get("status") and meta["status"] < 300:
            counts.ttft_ms.append(first)


def _int(value) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def key_state(key: dict, now: float) -> str:
    """`ready`, `cooling until ...`, `disabled because ...` or `at its limit: ...`, then the
    client sessions bound to the key (session affinity), if any."""
    if key.get("disabled"):
        state = f"disabled because {key['disabled']}"
    elif key.get("cooling_until", 0) > now:
        until = time.strftime("%H:%M:%S", time.localtime(key["cooling_until"]))
        state = f"cooling until {until} ({key['cooling_until'] - now:.0f}s)"
    elif key.get("at_limit"):
        state = f"at its limit: {key['at_limit']}"
    else:
        state = "ready"
    sessions = key.get("sessions") or 0
    return state + (f"; {sessions} session{'s' if sessions != 1 else ''}" if sessions else "")


def breaker_state(breaker: dict, now: float) -> str:
    if breaker["state"] == "open":
        return f"open, next probe in {max(0.0, breaker['open_until'] - now):.0f}s"
    return breaker["state"]


def format_status(status: dict, now: float | None = None) -> str:
    """The table `ccx-addon status` prints."""
    now = time.time() if now is None else now
    header = ("channel", "breaker", "requests", "failures", "tokens in", "tokens out", "p50 ttft")
    rows = [header]
    for channel in status["channels"]:
        p50 = channel["ttft_p50_ms"]
        rows.append((channel["name"] + ("" if channel.get("active", True) else " (inactive)"),
                     breaker_state(channel["breaker"], now), str(channel["requests"]), str(channel["failures"]),
                     str(channel["tokens_in"]), str(channel["tokens_out"]), "-" if p50 is None else f"{p50}ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [f"ccx-addon status since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status['since']))} "
             f"({now - status['since']:.0f}s)"]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if index:
            for key in status["channels"][index - 1]["keys"]:
                lines.append(f"    key {key['key']}: {key_state(key, now)}")
    return "\n".join(lines)
