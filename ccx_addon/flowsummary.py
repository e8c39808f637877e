"""What the flow list says about each gateway request: the comment, its marker and the
mitmdump summary line. Pure functions over what the gateway recorded, so tests call them
directly.

The comment is written to be filtered with `~comment REGEX`, which works in mitmdump,
mitmproxy and both mitmweb versions (11 filters in the browser, 12 on the server):
- `^ccx CHANNEL ` the channel that answered; `CHANNEL#` every request that reached it;
- the requested and upstream model as `REQUESTED → UPSTREAM`;
- `session XXXXXXXX` the client session (OpenCode's `x-session-id`);
- `failed` / `rejected` every failure, `failover` answers served after a failover.
Words are lower-case: mitmproxy 11.0 matches filters case-sensitively, later versions and
mitmweb 11's browser filters do not.
"""

import dataclasses
import json
import time

from mitmproxy import http

from .sse import StreamCapture
from .state import FlowRecord

# mitmweb renders these shortcodes as coloured dots in the flow list.
MARK_FAILOVER = ":yellow_circle:"
MARK_REJECTED = ":orange_circle:"
MARK_UPSTREAM_ERROR = ":red_circle:"

# OpenCode sends both, with the same value for a whole session. Not a secret.
SESSION_HEADERS = ("x-session-id", "x-session-affinity")
SESSION_LABEL_LENGTH = 8


def session_label(headers: http.Headers) -> str:
    """A short, stable label for the client session. OpenCode's ids (`ses_` + a time-ordered
    part + a random part) share their first characters across every session started within
    minutes of each other, so the label is the random end of the id."""
    for name in SESSION_HEADERS:
        if value := headers.get(name, "").strip():
            return value[-SESSION_LABEL_LENGTH:]
    return ""


# --- time to first token ----------------------------------------------------------------------


def is_token_event(payload: object) -> bool:
    """Whether a `chat.completion.chunk` carries generated output (text, reasoning, a tool
    call or a refusal), not just the role or a finish reason."""
    if not isinstance(payload, dict):
        return False
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(
            delta.get(field) for field in ("content", "reasoning_content", "reasoning", "tool_calls", "refusal")
        ):
            return True
        if choice.get("text"):
            return True
    return False


def scan_for_first_token(data: bytes | bytearray, start: int) -> tuple[bool, int]:
    """Look through the complete SSE lines of `data` from `start` for the first event with
    output. Returns (found, where to continue scanning)."""
    position = start
    while (end := data.find(b"\n", position)) != -1:
        line = bytes(data[position:end]).strip()
        position = end + 1
        if not line.startswith(b"data:"):
            continue
        try:
            payload = json.loads(line[5:])
        except ValueError:
            continue
        if is_token_event(payload):
            return True, position
    return False, position


class TimedStreamCapture(StreamCapture):
    """A StreamCapture that also notes when the first token arrived, and keeps the end of
    the stream (where `usage` is) even when the body is longer than what the flow keeps."""

    __slots__ = ("first_token_at", "scanned", "tail")
    TAIL = 16 * 1024

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.first_token_at: float | None = None
        self.scanned = 0
        self.tail = bytearray()

    def __call__(self, chunk: bytes) -> bytes:
        chunk = super().__call__(chunk)
        if chunk:
            self.tail += chunk
            if len(self.tail) > 2 * self.TAIL:  # trim rarely: no 16 KB copy per chunk
                del self.tail[:-self.TAIL]
            # Scan only what is kept: the first token is in the first events.
            if self.first_token_at is None and self.scanned < len(self.kept):
                found, self.scanned = scan_for_first_token(self.kept, self.scanned)
                if found:
                    self.first_token_at = time.time()
        return chunk


# --- measurements -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds since the gateway received the request headers."""

    ttfb: float | None  # response headers (for a non-streaming answer: the whole generation)
    ttft: float | None  # streams: first generated token
    total: float

    def as_metadata(self) -> dict:
        def ms(value):
            return None if value is None else round(value * 1000)

        return {"ttfb_ms": ms(self.ttfb), "ttft_ms": ms(self.ttft), "duration_ms": ms(self.total)}


def measure(record: FlowRecord, flow: http.HTTPFlow, now: float | None = None) -> Timing:
    response = flow.response
    end = (response.timestamp_end if response is not None else None) or now or time.time()
    ttfb = response.timestamp_start - record.started if response is not None and response.timestamp_start else None
    ttft = None
    if record.stream:
        capture = record.capture
        first = getattr(capture, "first_token_at", None) or (capture.first_chunk_at if capture else None)
        # A stream the gateway made itself (echo, converted JSON) arrives whole: first token = first byte.
        ttft = first - record.started if first else ttfb
    return Timing(ttfb, ttft, max(0.0, end - record.started))


def format_tokens(usage: dict | None) -> str:
    if not usage:
        return ""
    return f"tokens in {usage.get('prompt_tokens', '?')} out {usage.get('completion_tokens', '?')}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


def format_timing(timing: Timing | None, stream: bool) -> list[str]:
    if timing is None:
        return []
    first = timing.ttft if stream else timing.ttfb
    label = "ttft" if stream else "ttfb"
    return ([f"{label} {_ms(first)}"] if first is not None else []) + [f"{timing.total:.2f}s"]


# --- the comment ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What happened to one request, in the words of the comment and the log line."""

    served_by: str  # "deepseek (deepseek#1)", "" when no channel answered
    models: str  # "gpt-5 → deepseek-chat", or just the requested model
    attempts: str  # "attempt 2/2, failover after glm (glm#1): 503 overloaded"
    status: str  # "200 stream", "503 failed", "401 rejected"
    problems: tuple[str, ...]  # errors after the answer started
    marker: str
    failed: bool
    rejected: str = ""  # the gateway's error code when it answered itself
    fixes: str = ""  # the request fixes the serving attempt got (presets, channel fixes)
    affinity: str = ""  # session affinity's key choice, e.g. "→ pool#2 (new)"
    proxy: str = ""  # the serving channel's proxy, credentials masked


def tries_of(record: FlowRecord) -> list:
    if record.result is None:
        return []
    return record.result.tries


def judge(record: FlowRecord, status: int | None, error: str = "") -> Verdict | None:
    """None for the gateway's own endpoints (/health, /v1/models)."""
    status_text = str(status) if status is not None else "no answer"
    if record.rejected:
        return Verdict("", record.requested_model, "", f"{status_text} rejected", (), MARK_REJECTED, True, record.rejected)
    if record.endpoint != "chat":
        return None
    stream = " stream" if record.stream else ""
    result = record.result
    if result is None:
        why = "client disconnected before any answer" if record.client_gone else (error or "no answer")
        failed = "failed" if status is None else f"{status} failed"
        return Verdict("", record.requested_model, "", failed, (why,), MARK_UPSTREAM_ERROR, True)

    tries = tries_of(record)
    earlier = result.attempts[:-1] if result.route else result.attempts
    why = "; ".join(f"{a.channel} ({a.key}): {a.outcome}" for a in earlier)
    problems = tuple(p for p in (error, f"stream ended early: {record.stream_failure}" if record.stream_failure else "") if p)
    failed = bool(problems) or not result.ok
    if status is None:
        status = result.status
    if result.route is not None:
        route = result.route
        served_by = f"{route.channel.name} ({result.key_label})"
        models = f"{record.requested_model} → {route.upstream_model}"
        attempts = f"attempt {len(tries)}/{max(len(tries), result.candidates)}"
        if why:
            attempts += (", failover after " if result.served_by_failover and not failed else " after ") + why
    else:
        served_by, models, attempts = "", record.requested_model, f"tried {why}"
    if failed:
        marker = MARK_UPSTREAM_ERROR
    elif result.served_by_failover:
        marker = MARK_FAILOVER
    else:
        marker = ""
    return Verdict(served_by, models, attempts, f"{status}{stream}" + (" failed" if failed else ""), problems, marker, failed,
                   fixes=", ".join(result.fixes),
                   affinity=result.affinity, proxy=proxy_of(result))


def proxy_of(result) -> str:
    """The serving channel's proxy as shown (`http://user:***@host:port`), or ""."""
    proxy = result.route.channel.proxy if result.route is not None else None
    return proxy.display if proxy is not None else ""


def comment_for(
    verdict: Verdict | None, endpoint: str = "", timing: Timing | None = None, usage: dict | None = None,
    session: str = "", stream: bool = False,
) -> str:
    """One line for mitmweb's comment column, e.g.
    `ccx deepseek (deepseek#1) | gpt-5 → deepseek-chat | attempt 1/1 | 200 stream | ttft 412ms | 3.20s | tokens in 1200 out 340 | session 3f2a9c1d`."""
    if verdict is None:
        return f"ccx local: {endpoint}"
    if verdict.rejected:
        parts = [f"ccx rejected: {verdict.status.removesuffix(' rejected')} {verdict.rejected}"]
        parts += [verdict.models] if verdict.models else []
    else:
        parts = [f"ccx {verdict.served_by}" if verdict.served_by else "ccx failed", verdict.models]
        parts += [verdict.attempts] if verdict.attempts else []
        parts += [f"fixes: {verdict.fixes}"] if verdict.fixes else []
        parts.append(verdict.status)
        parts += verdict.problems
        parts += format_timing(timing, stream)
        parts += [format_tokens(usage)] if usage else []
    parts += [f"proxy {verdict.proxy}"] if verdict.proxy else []
    parts += [_session_part(session, verdict)] if session else []
    return " | ".join(p for p in parts if p)


def _session_part(session: str, verdict: Verdict) -> str:
    """`session 3f2a9c1d`, plus the key session affinity chose: `→ pool#2 (new)`."""
    return f"session {session} {verdict.affinity}" if verdict.affinity else f"session {session}"


def summary_line(
    method: str, path: str, verdict: Verdict, timing: Timing | None = None, usage: dict | None = None,
    session: str = "", stream: bool = False,
) -> str:
    """mitmdump's line for a gateway request, in the spirit of its own flow lines:
    `POST /v1/chat/completions gpt-5 → deepseek-chat via deepseek (deepseek#1) << 200 stream, ttft 412ms, 3.20s, tokens in 1200 out 340`."""
    head = f"{method} {path}"
    if verdict.models:
        head += f" {verdict.models}"
    if verdict.served_by:
        head += f" via {verdict.served_by}" + (f" through proxy {verdict.proxy}" if verdict.proxy else "")
    answer = [verdict.status + (f" {verdict.rejected}" if verdict.rejected else "")]
    answer += list(verdict.problems)
    if not verdict.rejected:
        answer += format_timing(timing, stream)
        answer += [format_tokens(usage)] if usage else []
    line = f"{head} << {', '.join(a for a in answer if a)}"
    if verdict.attempts and (verdict.attempts != "attempt 1/1"):
        line += f"; {verdict.attempts}"
    if session:
        line += f" [{_session_part(session, verdict)}]"
    return line
