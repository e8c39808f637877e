"""What an upstream answer means for the request, the key and the channel. Pure functions.

Verdicts come from structured fields only: the HTTP status, the content type, and the
error's `code`/`type` (or MiniMax's `base_resp.status_code`), read per preset. Never from a
substring of the body: upstreams quote the client's model name and messages back, so a
request for model `gpt-insufficient_quota` answered by a 404 that quotes it must not
disable any key (issue 9, item 3).

| what | examples | action |
|---|---|---|
| quota or balance used up | GLM 1113, DeepSeek 402, MiniMax 1008, Kimi `exceeded_current_quota_error`, OpenAI `insufficient_quota` | disable the key |
| rate limit | GLM 1302, Kimi `rate_limit_reached_error`, a plain 429 | cool the key down (GLM 1308: until its reset) |
| overloaded | 5xx, Kimi `engine_overloaded_error`, GLM 1305 | next channel |
| a request error every channel would refuse | other 4xx, MiniMax 2013 | stop and tell the client |
"""

import dataclasses
import datetime
import json
import re
from typing import Any

# Actions.
SERVE = "serve"  # give the client this answer
NEXT_KEY = "next_key"  # the key's problem: try the channel's next key
NEXT_CHANNEL = "next_channel"  # the channel's problem: try the next channel
REFUSE = "refuse"  # a request error hidden in a 200: stop and tell the client (as a 400)

# Key penalties.
COOLDOWN, DISABLE = "cooldown", "disable"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What to do with an upstream answer."""

    action: str  # SERVE | NEXT_KEY | NEXT_CHANNEL | REFUSE
    reason: str = ""
    key_penalty: str = ""  # COOLDOWN | DISABLE | ""
    channel_failure: bool = False  # counts against the channel's circuit breaker
    # A cooldown's end announced by the upstream (epoch seconds; GLM 1308's reset time).
    cool_until: float | None = None


@dataclasses.dataclass(frozen=True)
class UpstreamError:
    """The structured fields of an upstream error body. `message` is the upstream's own
    text (it may quote the client): shown, never used to decide a key's fate."""

    code: str = ""  # error.code, or base_resp.status_code, as a string
    type: str = ""  # error.type
    message: str = ""
    http_status: int | None = None  # a status the body states (error.http_code, a 3-digit code)
    base_resp: bool = False  # read from MiniMax's `base_resp`: its codes are MiniMax's


@dataclasses.dataclass(frozen=True)
class Rules:
    """One provider's codes (matched against `error.code` and `error.type`)."""

    name: str
    quota: frozenset[str] = frozenset()
    rate_limit: frozenset[str] = frozenset()
    overloaded: frozenset[str] = frozenset()
    key_rejected: frozenset[str] = frozenset()
    request_error: frozenset[str] = frozenset()
    # Rate limits whose message names when they reset (GLM 1308 "...将在 2025-01-01 12:00:00 重置").
    reset_announced: frozenset[str] = frozenset()


def _codes(*names: str) -> frozenset[str]:
    return frozenset(names)


# Codes no provider uses for anything else: meaningful on every channel, preset or not.
GENERIC = Rules(
    "generic",
    quota=_codes("insufficient_quota", "exceeded_current_quota_error", "insufficient_balance",
                 "insufficient_balance_error", "billing_hard_limit_reached"),
    rate_limit=_codes("rate_limit_exceeded", "rate_limit_reached_error", "rate_limit_error"),
    overloaded=_codes("engine_overloaded_error", "server_overloaded", "overloaded_error"),
    key_rejected=_codes("invalid_api_key", "invalid_authentication_error", "authentication_error"),
)

PRESET_RULES = {
    "openai": Rules("openai"),
    # DeepSeek: 402 Insufficient Balance, 429 rate limit, 503 overloaded (plain statuses).
    "deepseek": Rules("deepseek"),
    # GLM codes are strings ("1113"); 1000-1004 authentication, 111x account state.
    "glm": Rules(
        "glm",
        quota=_codes("1113", "1309"),
        rate_limit=_codes("1302", "1303", "1304", "1308", "1310"),
        overloaded=_codes("1305"),
        key_rejected=_codes("1000", "1001", "1002", "1003", "1004", "1110", "1111", "1112", "1120"),
        request_error=_codes("1210", "1211", "1213", "1214", "1215", "1301"),
        reset_announced=_codes("1308", "1310"),
    ),
    # MiniMax: in base_resp.status_code (also with HTTP 200 and inside streams).
    "minimax": Rules(
        "minimax",
        quota=_codes("1008"),
        rate_limit=_codes("1002", "1039"),
        overloaded=_codes("1000", "1001", "1013", "1024", "1033"),
        key_rejected=_codes("1004", "2049"),
        request_error=_codes("1026", "1027", "2013", "20132"),
    ),
    "kimi": Rules("kimi"),
}

_NO_RULES = Rules("")


def rules_for(preset: str, error: UpstreamError) -> tuple[Rules, Rules]:
    """The preset's own codes, then the generic ones. A `base_resp` code is MiniMax's own
    whatever the channel's preset: no other provider answers in that shape."""
    if error.base_resp:
        preset = "minimax"
    return PRESET_RULES.get(preset, _NO_RULES), GENERIC


# --- reading the structured fields -------------------------------------------------------


def parse_error(payload: Any) -> UpstreamError | None:
    """The error a parsed JSON body carries: `{"error": {...}}` (OpenAI, GLM, Kimi, MiniMax's
    `{"type": "error", "error": {...}}`) or a non-zero `base_resp.status_code` (MiniMax).
    None for a body without one (a real answer). A bare `{"error": "text"}` has no code."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and "choices" not in payload:
        code = error.get("code")
        status = _http_status(error.get("http_code")) or _http_status(error.get("status")) or _http_status(code)
        return UpstreamError(
            code=_text(code), type=_text(error.get("type")),
            message=_text(error.get("message"))[:500], http_status=status,
        )
    if isinstance(error, str) and error and "choices" not in payload:
        return UpstreamError(message=error[:500])
    base = payload.get("base_resp")
    if isinstance(base, dict) and base.get("status_code") not in (0, None, "0", ""):
        return UpstreamError(
            code=_text(base.get("status_code")), message=_text(base.get("status_msg"))[:500], base_resp=True,
        )
    return None


def parse_error_body(body: bytes) -> UpstreamError | None:
    """`parse_error` of a raw JSON body; None when it is not JSON or carries no error."""
    stripped = body.lstrip()
    if not stripped.startswith(b"{"):
        return None
    if b"error" not in stripped and b"base_resp" not in stripped and b"\\u" not in stripped:
        # Neither key can be in it (a key spelled with \u escapes takes the long way): skip
        # parsing what is, almost always, a normal answer.
        return None
    try:
        return parse_error(json.loads(stripped))
    except (ValueError, RecursionError):
        return None


def _text(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return ""
    return str(value)


def _http_status(value: Any) -> int | None:
    """A value that states an HTTP error status (429, "503"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) == 3:
        value = int(value)
    return value if isinstance(value, int) and 400 <= value <= 599 else None


# --- the verdicts ------------------------------------------------------------------------


def judge_answer(status: int, body: bytes, preset: str = "", content_type: str | None = None) -> Verdict:
    """The verdict on a buffered answer. Precedence: a redirect or a success that is not
    JSON fails the attempt; then the error's codes (preset first, then generic); then the
    status alone."""
    if 300 <= status < 400:
        return Verdict(NEXT_CHANNEL, f"{status} redirect", channel_failure=True)
    if 200 <= status < 300:
        if wrong := unexpected_content_type(content_type, body):
            return Verdict(NEXT_CHANNEL, f"{status} {wrong} where JSON was expected", channel_failure=True)
        error = parse_error_body(body)
        return Verdict(SERVE) if error is None else judge_error_in_success(status, error, preset)
    error = parse_error_body(body)
    if error is not None and (verdict := judge_codes(status, error, preset)) is not None:
        return verdict
    return judge_status_only(status, _short_message(body, error))


def judge_error_in_success(status: int, error: UpstreamError, preset: str = "") -> Verdict:
    """A 200 (buffered, or a stream's first event) that carries an error: never a success.
    Its codes decide; a status the body states counts as the status; otherwise the
    channel failed."""
    if (verdict := judge_codes(status, error, preset)) is not None:
        return verdict
    if error.http_status is not None:
        verdict = judge_status_only(error.http_status, error.message)
        if verdict.action != SERVE:
            return dataclasses.replace(verdict, reason=f"{status} with an error body: {verdict.reason}")
        return Verdict(REFUSE, f"{status} with an error body: {error.http_status} {error.message}".strip())
    return Verdict(NEXT_CHANNEL, f"{status} with an error body: {describe(error)}", channel_failure=True)


def judge_codes(status: int, error: UpstreamError, preset: str = "") -> Verdict | None:
    """The verdict the error's codes give (preset rules first), or None if no rule knows them."""
    codes = {c for c in (error.code, error.type) if c}
    if not codes:
        return None
    what = describe(error)
    for rules in rules_for(preset, error):
        if codes & rules.quota:
            return Verdict(NEXT_KEY, f"{status} quota or balance used up: {what}", key_penalty=DISABLE)
        if codes & rules.key_rejected:
            return Verdict(NEXT_KEY, f"{status} key rejected: {what}", key_penalty=DISABLE)
        if codes & rules.rate_limit:
            until = reset_time(error.message) if codes & rules.reset_announced else None
            return Verdict(NEXT_KEY, f"{status} rate limited: {what}", key_penalty=COOLDOWN, cool_until=until)
        if codes & rules.overloaded:
            return Verdict(NEXT_CHANNEL, f"{status} overloaded: {what}", channel_failure=True)
        if codes & rules.request_error:
            action = SERVE if status >= 400 else REFUSE
            return Verdict(action, f"{status} request refused: {what}")
    return None


def judge_status_only(status: int, message: str = "") -> Verdict:
    """The generic rules, for errors no code rule knows."""
    if status == 429:
        return Verdict(NEXT_KEY, "429 rate limited", key_penalty=COOLDOWN)
    if status in (401, 403):
        return Verdict(NEXT_KEY, f"{status} key rejected", key_penalty=DISABLE)
    if status == 402:
        return Verdict(NEXT_KEY, "402 payment required", key_penalty=DISABLE)
    if status == 408 or status >= 500:
        return Verdict(NEXT_CHANNEL, f"{status} {message}".strip(), channel_failure=True)
    # 400-class request errors: another channel would reject the request too.
    return Verdict(SERVE)


def describe(error: UpstreamError) -> str:
    """The upstream's message, shortened, with its code, for attempt records and disable
    reasons: "Insufficient balance (code 1113)"."""
    message = " ".join(error.message.split())[:160]
    if error.code and error.code not in message:
        return f"{message} (code {error.code})".strip()
    return message or error.type or "error"


def unexpected_content_type(content_type: str | None, body: bytes) -> str:
    """Why a 2xx answer is not the JSON a chat request expects ("" when it is). A missing
    content type is forgiven when the body is a JSON object."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if not kind:
        return "" if body.lstrip().startswith(b"{") else "an answer without a content type"
    if kind == "application/json" or kind.endswith("+json") or kind == "text/event-stream":
        return ""
    return kind


def _short_message(body: bytes, error: UpstreamError | None) -> str:
    if error is not None:
        return error.message[:160]
    text = body[:120].decode("utf-8", "replace").strip()
    return text.split("\n", 1)[0][:80] if text and not text.startswith(("<", "{")) else ""


# GLM 1308/1310 say when the limit resets, in China time: "...将在 2025-08-01 15:04:05 重置",
# "Your limit will reset at 2025-08-01 15:04:05".
_RESET_AT = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})")
_CHINA = datetime.timezone(datetime.timedelta(hours=8))


def reset_time(message: str) -> float | None:
    """The reset time a rate-limit message names (epoch seconds), or None."""
    match = _RESET_AT.search(message)
    if match is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(match.group(1).replace("T", " "))
    except ValueError:
        return None
    return when.replace(tzinfo=_CHINA).timestamp()


# --- the first event of a stream ---------------------------------------------------------


def first_event_data(buffer: bytes) -> tuple[bool, bytes | None]:
    """(complete, data) for the first SSE event in `buffer` that is not a comment: complete
    is False while more bytes are needed; data is the event's joined `data:` lines (None if
    it has none, e.g. an `event:` line alone)."""
    text = buffer.replace(b"\r\n", b"\n")
    pos = 0
    while (end := text.find(b"\n\n", pos)) != -1:
        lines = [line for line in text[pos:end].split(b"\n") if line and not line.startswith(b":")]
        pos = end + 2
        if not lines:
            continue  # comments only (": keep-alive"): not an event
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        return True, b"\n".join(data) if data else None
    return False, None


def judge_first_event(data: bytes | None, preset: str = "") -> Verdict | None:
    """The verdict on a 200 stream whose first event is an error (`{"error": ...}` or a
    non-zero `base_resp.status_code`), or None: serve the stream."""
    if not data or not data.lstrip().startswith(b"{"):
        return None
    error = parse_error_body(data)
    return None if error is None else judge_error_in_success(200, error, preset)
