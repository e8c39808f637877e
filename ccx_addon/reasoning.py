"""Reasoning passback: remember the `reasoning_content` upstreams sent, to put it back on
the assistant messages clients return without it (DeepSeek and Kimi thinking modes refuse
those; OpenCode sends it back only when it has it and it is non-empty).

Keys, per channel: each tool-call id of the answer (what the client echoes exactly), else a
hash of the answer's text. Bounded by entries, bytes and age. Pure: no I/O, no flows.
"""

import collections
import hashlib
import json
import logging
import time

from .fixes import text_of

logger = logging.getLogger(__name__)

MAX_ENTRIES = 10_000
MAX_BYTES = 32 * 1024 * 1024
TTL = 4 * 3600.0  # a coding session pauses for hours; the notes ask for at least 2 h
# What one answer may contribute (reasoning text, and text kept to hash the answer by).
MAX_ANSWER_BYTES = 1024 * 1024


def text_key(text: str) -> str:
    return "text:" + hashlib.sha256(text.strip().encode("utf-8", "surrogatepass")).hexdigest()


def message_keys(message: dict) -> list[str]:
    """The keys an assistant message (as a client sends it back) is looked up under."""
    keys = []
    for call in _list(message.get("tool_calls")):
        if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"]:
            keys.append("call:" + call["id"])
    text = text_of(message.get("content"))
    if text and text.strip():
        keys.append(text_key(text))
    return keys


def _list(value) -> list:
    return value if isinstance(value, list) else []


class ReasoningCache:
    """LRU over (channel, key) -> reasoning text, with a TTL and byte bound."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES, ttl: float = TTL) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.bytes = 0
        self._entries: collections.OrderedDict[tuple[str, str], tuple[float, str]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, channel: str, keys: list[str], reasoning: str, now: float | None = None) -> None:
        if not reasoning or not keys or len(reasoning) > MAX_ANSWER_BYTES:
            return
        now = time.time() if now is None else now
        for key in keys:
            self._drop((channel, key))
            self._entries[(channel, key)] = (now + self.ttl, reasoning)
            self.bytes += len(reasoning)
        self._evict(now)

    def recall(self, channel: str, message: dict, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        for key in message_keys(message):
            entry = self._entries.get((channel, key))
            if entry is None:
                continue
            if entry[0] < now:
                self._drop((channel, key))
                continue
            self._entries.move_to_end((channel, key))
            return entry[1]
        return None

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry[1])

    def _evict(self, now: float) -> None:
        while self._entries and (
            len(self._entries) > self.max_entries or self.bytes > self.max_bytes
            or next(iter(self._entries.values()))[0] < now
        ):
            self._drop(next(iter(self._entries)))


class AnswerReasoning:
    """Collects one answer's reasoning, tool-call ids and text (first choice), from a JSON
    completion or from stream chunks, within MAX_ANSWER_BYTES each."""

    __slots__ = ("reasoning", "text", "call_ids", "size")

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.text: list[str] = []
        self.call_ids: list[str] = []
        self.size = 0

    def add(self, part: dict) -> None:
        """`part`: a choice's `message` or `delta`."""
        for field, parts in (("reasoning_content", self.reasoning), ("content", self.text)):
            value = part.get(field)
            if isinstance(value, str) and value and self.size + len(value) <= 2 * MAX_ANSWER_BYTES:
                parts.append(value)
                self.size += len(value)
        for call in _list(part.get("tool_calls")):
            if isinstance(call, dict) and isinstance(call.get("id"), str) and call["id"] and len(self.call_ids) < 128:
                self.call_ids.append(call["id"])

    def add_choices(self, payload: object) -> None:
        if not isinstance(payload, dict):
            return
        for choice in _list(payload.get("choices")):
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                part = choice.get("message") or choice.get("delta")
                if isinstance(part, dict):
                    self.add(part)

    def store(self, cache: ReasoningCache, channel: str) -> None:
        reasoning = "".join(self.reasoning)
        if not reasoning.strip():
            return
        keys = ["call:" + i for i in self.call_ids]
        text = "".join(self.text)
        if text.strip():
            keys.append(text_key(text))
        cache.remember(channel, keys, reasoning)


def capture_completion(cache: ReasoningCache, channel: str, body: bytes) -> None:
    """Remember the reasoning of a JSON `chat.completion` (or of an SSE body made whole)."""
    answer = AnswerReasoning()
    if body.lstrip().startswith(b"{"):
        try:
            answer.add_choices(json.loads(body))
        except ValueError:
            return
    else:
        for line in body.split(b"\n"):
            _add_event_line(answer, line)
    answer.store(cache, channel)


def _add_event_line(answer: AnswerReasoning, line: bytes) -> None:
    line = line.strip()
    if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
        return
    try:
        answer.add_choices(json.loads(line[5:]))
    except ValueError:
        pass


class ReasoningObserver:
    """A handover stream transform that reads reasoning out of an SSE answer as it passes:
    `feed` returns every chunk unchanged at once; only complete lines are parsed (the rest
    is kept until its newline, at most MAX_ANSWER_BYTES). Stores when the stream ends."""

    def __init__(self, cache: ReasoningCache, channel: str) -> None:
        self.cache = cache
        self.channel = channel
        self.answer: AnswerReasoning | None = AnswerReasoning()
        self.partial = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.answer is not None:
            try:
                self._observe(chunk)
            except Exception:  # a bug here must never cost the client its stream
                logger.exception("reasoning capture failed; this answer's reasoning is not kept")
                self.answer = None
        return chunk

    def _observe(self, chunk: bytes) -> None:
        data = self.partial + chunk if self.partial else chunk
        end = data.rfind(b"\n")
        if end == -1:
            self.partial = data if len(data) <= MAX_ANSWER_BYTES else b""
            return
        self.partial = data[end + 1:]
        if b"reasoning_content" in data or self.answer.reasoning:
            for line in data[:end].split(b"\n"):
                _add_event_line(self.answer, line)
        elif b"tool_calls" in data or b'"content"' in data:
            # Before any reasoning: only text and call ids matter, parse what carries them.
            for line in data[:end].split(b"\n"):
                if b"tool_calls" in line or b'"content"' in line:
                    _add_event_line(self.answer, line)

    def end(self) -> bytes:
        if self.answer is not None:
            try:
                if self.partial:
                    _add_event_line(self.answer, self.partial)
                self.answer.store(self.cache, self.channel)
            except Exception:
                logger.exception("reasoning capture failed; this answer's reasoning is not kept")
        self.partial = b""
        return b""
