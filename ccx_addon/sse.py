"""Server-sent events for Chat Completions: building, converting, capturing. Pure code."""

import json
import time
import uuid
from typing import Any

SSE_CONTENT_TYPE = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"


def is_event_stream(content_type: str | None) -> bool:
    return bool(content_type) and content_type.split(";", 1)[0].strip().lower() == SSE_CONTENT_TYPE


def event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n\n"


def error_event(message: str, type_: str = "upstream_error", code: str | None = None) -> bytes:
    return event({"error": {"message": message, "type": type_, "param": None, "code": code}})


def completion_to_events(completion: dict[str, Any]) -> bytes:
    """Turn a non-streaming `chat.completion` into the `chat.completion.chunk` events a
    streaming client expects. Needed when an upstream ignores `stream: true`: OpenCode,
    handed plain JSON, loops without ever showing an error."""
    base = {
        "id": completion.get("id") or f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": completion.get("created") or int(time.time()),
        "model": completion.get("model", ""),
    }
    if fingerprint := completion.get("system_fingerprint"):
        base["system_fingerprint"] = fingerprint
    out = bytearray()
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": message.get("role", "assistant")}
        for field in ("content", "reasoning_content", "refusal"):
            if message.get(field) is not None:
                delta[field] = message[field]
        if tool_calls := message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(tool_calls)
            ]
        out += event({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        out += event({
            **base,
            "choices": [{"index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}],
        })
    if usage := completion.get("usage"):
        out += event({**base, "choices": [], "usage": usage})
    out += DONE_EVENT
    return bytes(out)


def find_usage(body: bytes) -> dict[str, Any] | None:
    """The last `usage` object of a JSON body or an SSE stream, if any."""
    text = body.strip()
    if text.startswith(b"{"):
        try:
            usage = json.loads(text).get("usage")
        except (ValueError, AttributeError):
            return None
        return usage if isinstance(usage, dict) else None
    # In a stream, usage comes in one of the last events: search from the end.
    pos = len(body)
    while (pos := body.rfind(b"data: {", 0, pos)) != -1:
        end = body.find(b"\n", pos)
        line = body[pos + 6: end if end != -1 else len(body)]
        if b'"usage"' in line:
            try:
                usage = json.loads(line).get("usage")
            except ValueError:
                continue
            if isinstance(usage, dict):
                return usage
    return None


class StreamCapture:
    """A `flow.response.stream` callable: passes every chunk on unchanged and keeps the first
    `limit` bytes so the flow view can show the streamed body afterwards."""

    __slots__ = ("limit", "kept", "total", "first_chunk_at")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.total = 0
        self.first_chunk_at: float | None = None

    def __call__(self, chunk: bytes) -> bytes:
        if chunk:
            if self.first_chunk_at is None:
                self.first_chunk_at = time.time()
            self.total += len(chunk)
            room = self.limit - len(self.kept)
            if room > 0:
                self.kept += chunk[:room]
        return chunk

    @property
    def truncated(self) -> bool:
        return self.total > len(self.kept)
