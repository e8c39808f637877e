"""What the flow list says about each gateway request: the comment, its marker and the
mitmdump summary line. Pure functions over what the gateway recorded, so tests call them
directly.

The comment is written to be read in mitmweb's narrow comment column (the verdict first)
and filtered with `~comment REGEX`, which works in mitmdump, mitmproxy and both mitmweb
versions (11 filters in the browser, 12 on the server):
- `key CHANNEL#` the channel that answered; `CHANNEL#` every request that reached it;
- the requested and upstream model as `REQUESTED→UPSTREAM`;
- `session XXXXXXXX` the client session (OpenCode's `x-session-id`);
- `failed` / `rejected` every failure, `failover` answers served after a failover,
  `aborted` requests the client gave up.
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
# A client that gave up is not an upstream error.
MARK_CLIENT_ABORT = ":large_blue_circle:"
# A failed upstream attempt shown as a flow of its own.
MARK_ATTEMPT = ":purple_circle:"

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

# The first characters say what happened: mitmweb's comment column is 150 px wide whatever
# the window size, and shows about 17 characters (screenshot in docs/screenshots).
SERVED, FAILED, REJECTED, ABORTED, LOCAL = "✓", "✗", "⊘", "✂", "·"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What happened to one request, in the words of the comment and the log line."""

    head: str  # "✓ deepseek ⟵ glm 503", "✗ failed 400 kimi", "⊘ 401 rejected: invalid_api_key"
    models: str  # "gpt-5→deepseek-chat", or just the requested model
    status: str  # "200 stream", "503", "no answer"
    problems: tuple[str, ...]  # what went wrong, when the head alone does not say it
    failover: str  # "failover after glm (glm#1): 503 overloaded"; "" on a first-try success
    key: str  # the serving key's label, "deepseek#1"
    marker: str
    failed: bool
    kind: str = "served"  # served | failover | failed | rejected | aborted
    fixes: str = ""  # the request fixes the serving attempt got (presets, channel fixes)
    affinity: str = ""  # session affinity's key choice, e.g. "→ pool#2 (new)"
    proxy: str = ""  # the serving channel's proxy, credentials masked


def tries_of(record: FlowRecord) -> list:
    if record.result is None:
        return []
    return record.result.tries


def short_outcome(outcome: str) -> str:
    """A failed attempt's outcome in one or two words for the head: `503`, `timeout`,
    `unreachable`, `circuit open`, `cooling`."""
    if outcome[:3].isdigit():
        return outcome[:3]
    if outcome.startswith("skipped"):
        for words in ("circuit open", "half-open", "cooling", "disabled"):
            if words in outcome:
                return words
        return "skipped"
    if "timeout" in outcome or "within" in outcome:
        return "timeout"
    return "unreachable"


def failed_before(attempts) -> str:
    """`⟵ glm 503` for the failed attempt just before the one that served (`+N` more)."""
    if not attempts:
        return ""
    last = attempts[-1]
    more = f" +{len(attempts) - 1}" if len(attempts) > 1 else ""
    return f" ⟵ {last.channel} {short_outcome(last.outcome)}{more}"


def client_aborted(record: FlowRecord) -> bool:
    return record.client_gone or (record.stream_failure or "").startswith(("client disconnected", "not collected"))


def judge(record: FlowRecord, status: int | None, error: str = "") -> Verdict | None:
    """None for the gateway's own endpoints (/health, /v1/models)."""
    verdict = judge_outcome(record, status, error)
    result = record.result
    if verdict is None or result is None or verdict.kind == "rejected":
        return verdict
    return dataclasses.replace(
        verdict, fixes=", ".join(result.fixes), affinity=result.affinity, proxy=proxy_of(result),
    )


def proxy_of(result) -> str:
    """The serving channel's proxy as shown (`http://user:***@host:port`), or ""."""
    proxy = result.route.channel.proxy if result.route is not None else None
    return proxy.display if proxy is not None else ""


def judge_outcome(record: FlowRecord, status: int | None, error: str = "") -> Verdict | None:
    """The verdict words of `judge`, from the status and the attempts."""
    status_text = str(status) if status is not None else "no answer"
    if record.rejected:
        return Verdict(f"{REJECTED} {status_text} rejected: {record.rejected}", record.requested_model, "", (),
                       "", "", MARK_REJECTED, True, "rejected")
    if record.endpoint != "chat":
        return None
    stream = " stream" if record.stream else ""
    result = record.result
    if result is None:
        if record.client_gone:
            return Verdict(f"{ABORTED} aborted by client", record.requested_model, "no answer",
                           ("the client left before any answer; upstream request cancelled",), "", "",
                           MARK_CLIENT_ABORT, False, "aborted")
        return Verdict(f"{FAILED} failed {status_text}", record.requested_model, status_text, (error or "no answer",),
                       "", "", MARK_UPSTREAM_ERROR, True, "failed")
    if status is None:
        status = result.status
    route = result.route
    earlier = [a for a in (result.attempts[:-1] if route else result.attempts) if not a.ok]
    details = "; ".join(f"{a.channel} ({a.key}): {a.outcome}" for a in earlier)
    models = f"{record.requested_model}→{route.upstream_model}" if route else record.requested_model
    key = result.key_label if route and result.key_label not in ("", "-") else ""
    channel = route.channel.name if route else ""
    status_words = f"{status}{stream}"
    if client_aborted(record):
        return Verdict(f"{ABORTED} aborted by client {channel}".rstrip(), models, status_words + " (partial)", (),
                       f"failover after {details}" if details else "", key, MARK_CLIENT_ABORT, False, "aborted")
    problems = tuple(p for p in (error, f"stream ended early: {record.stream_failure}" if record.stream_failure else "") if p)
    if problems or not result.ok:
        where = f" {channel}" if channel else ""
        head = f"{FAILED} failed mid-stream{where}" if result.ok else f"{FAILED} failed {status}{where}"
        return Verdict(head, models, status_words, problems, f"tried {details}" if details else "", key,
                       MARK_UPSTREAM_ERROR, True, "failed")
    if earlier:
        return Verdict(f"{SERVED} {channel}{failed_before(earlier)}", models, status_words, (),
                       f"failover after {details}", key, MARK_FAILOVER, False, "failover")
    return Verdict(f"{SERVED} {channel}", models, status_words, (), "", key, "", False, "served")


def format_usage(verdict: Verdict, usage: dict | None) -> str:
    """`tokens in 1200 out 340`; `usage n/a` for an answer that carried none."""
    if usage:
        return format_tokens(usage)
    return "usage n/a" if verdict.kind in ("served", "failover") else ""


def comment_for(
    verdict: Verdict | None, endpoint: str = "", timing: Timing | None = None, usage: dict | None = None,
    session: str = "", stream: bool = False, links: str = "", replay_of: str = "",
) -> str:
    """One line for mitmweb's comment column, always in this order: verdict, models,
    status, problems, timing, tokens, failover details, serving key, session, linked flows
    (a replay: `↻` before the verdict, `replay of ID` after it).
    `✓ deepseek ⟵ glm 503 | gpt-5→deepseek-chat | 200 stream | ttft 412ms | 3.20s |
    tokens in 1200 out 340 | failover after glm (glm#1): 503 overloaded | key deepseek#1 |
    session 3f2a9c1d`."""
    if verdict is None:
        return f"{LOCAL} local {endpoint}"
    # A replay (from mitmweb): its mark before the verdict, what it replays right after.
    parts = [f"↻{verdict.head}", f"replay of {replay_of[:8]}"] if replay_of else [verdict.head]
    if verdict.kind != "rejected":
        parts += [verdict.models, verdict.status, *verdict.problems]
        parts += format_timing(timing, stream)
        parts.append(format_usage(verdict, usage) if timing is not None else "")  # not while in flight
        parts += [verdict.failover, f"fixes: {verdict.fixes}" if verdict.fixes else ""]
        parts += [f"key {verdict.key}" if verdict.key else "", f"proxy {verdict.proxy}" if verdict.proxy else ""]
    else:
        parts.append(verdict.models)
    parts += [session_part(session, verdict) if session else "", links]
    return " | ".join(p for p in parts if p)


def session_part(session: str, verdict: Verdict) -> str:
    """`session 3f2a9c1d`, plus the key session affinity chose: `→ pool#2 (new)`."""
    return f"session {session} {verdict.affinity}" if verdict.affinity else f"session {session}"


def summary_line(method: str, path: str, comment: str) -> str:
    """mitmdump's line for a gateway request: the client's method and path, then the same
    words as the comment."""
    return f"{method} {path} {comment}"
