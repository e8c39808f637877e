"""Output caps upstreams announce in their errors, learnt and applied up front.

DeepSeek refuses OpenCode's default `max_tokens` 32000 with 400 `Invalid max_tokens value,
the valid range of max_tokens is [1, 8192]`. The gateway lowers the value to the cap,
retries once on the same key, and remembers the cap per (channel, upstream model) so later
requests are sent within it at once. Reading a number from the upstream's message is safe
here: it never decides a key's fate, and only lowers what this gateway sends upstream.
"""

import collections
import json
import re

from .verdicts import parse_error_body

# The parameters a cap applies to, in the order they are looked for in a body.
CAPPED_PARAMS = ("max_tokens", "max_completion_tokens")

# Messages that state a cap, each with the cap as its last group. Anchored on the
# parameter's own name, so a message about something else never matches.
_ANNOUNCEMENTS = (
    # DeepSeek: "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"
    re.compile(r"valid range of `?(?:max_tokens|max_completion_tokens)`? is \[\s*\d+\s*,\s*(\d+)\s*\]", re.I),
    # OpenAI: "max_tokens is too large: 32000. This model supports at most 16384 completion tokens"
    re.compile(r"(?:max_tokens|max_completion_tokens)`? is too large: \d+\. This model supports at most (\d+) completion tokens", re.I),
    # Others: "max_tokens must be less than or equal to 8192", "max_tokens must be <= 8192"
    re.compile(r"`?(?:max_tokens|max_completion_tokens)`? must be (?:less than or equal to|<=|at most) `?(\d+)`?", re.I),
)

# Remembered caps, at most: each is a few dozen bytes; the oldest go first.
MAX_LEARNED = 1024


def announced_cap(status: int, body: bytes) -> int | None:
    """The output cap a 400 answer's error message states, or None."""
    if status != 400:
        return None
    error = parse_error_body(body)
    if error is None or not error.message:
        return None
    for pattern in _ANNOUNCEMENTS:
        if match := pattern.search(error.message):
            cap = int(match.group(1)[:9])
            return cap if cap >= 1 else None
    return None


def requested_output(body: bytes) -> int | None:
    """The largest capped parameter value a request body asks for, or None."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    values = [data[p] for p in CAPPED_PARAMS if _is_count(data.get(p))]
    return max(values) if values else None


def apply_cap(body: bytes, cap: int) -> tuple[bytes, str]:
    """`body` with every capped parameter above `cap` lowered to it, and a label of what
    changed ("" and the body unchanged when nothing was above it). The value is replaced
    in place when it can be found unambiguously, so the rest of the body keeps its bytes."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body, ""
    if not isinstance(data, dict):
        return body, ""
    lowered = [p for p in CAPPED_PARAMS if _is_count(data.get(p)) and data[p] > cap]
    if not lowered:
        return body, ""
    label = ", ".join(f"{p} {data[p]}→{cap}" for p in lowered)
    for param in lowered:
        pattern = re.compile(rb'"%s"\s*:\s*%d(?![\d.eE])' % (param.encode(), data[param]))
        if len(pattern.findall(body)) != 1:
            break
        body = pattern.sub(b'"%s": %d' % (param.encode(), cap), body)
    else:
        return body, label
    for param in lowered:
        data[param] = cap
    try:
        return json.dumps(data, ensure_ascii=False).encode(), label
    except UnicodeEncodeError:  # a lone surrogate: keep it escaped
        return json.dumps(data).encode(), label


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class LearnedCaps:
    """Caps per (channel, upstream model), bounded to MAX_LEARNED entries."""

    def __init__(self, limit: int = MAX_LEARNED) -> None:
        self.limit = limit
        self._caps: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    def get(self, channel: str, model: str) -> int | None:
        return self._caps.get((channel, model))

    def learn(self, channel: str, model: str, cap: int) -> None:
        key = (channel, model)
        known = self._caps.pop(key, None)
        self._caps[key] = cap if known is None else min(known, cap)
        while len(self._caps) > self.limit:
            self._caps.popitem(last=False)

    def __len__(self) -> int:
        return len(self._caps)
