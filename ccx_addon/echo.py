"""The built-in `echo:` channel: answers from the gateway itself, so a newcomer can see the
whole path work before owning any provider key."""

import json
import time
import uuid
from typing import Any

from .body import ChatRequest
from .sse import DONE_EVENT, SSE_CONTENT_TYPE, event

ECHO_PREFIX = "[ccx-addon echo] "


def last_user_text(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(
                part.get("text", "") for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
    return ""


def echo_reply(request: ChatRequest, upstream_model: str) -> tuple[str, bytes]:
    """(content type, body) answering `request` with its last user message."""
    text = ECHO_PREFIX + (last_user_text(request.data.get("messages")) or "(no user message)")
    prompt_tokens = max(1, len(json.dumps(request.data.get("messages", ""))) // 4)
    completion_tokens = max(1, len(text) // 4)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    base = {
        "id": f"chatcmpl-echo-{uuid.uuid4().hex[:16]}",
        "created": int(time.time()),
        "model": upstream_model,
    }
    if not request.stream:
        completion = {
            **base,
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }],
            "usage": usage,
        }
        return "application/json", json.dumps(completion, ensure_ascii=False).encode("utf-8", "backslashreplace")

    chunk = {**base, "object": "chat.completion.chunk"}
    out = bytearray(event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
    for i, word in enumerate(text.split(" ")):
        piece = word if i == 0 else " " + word
        out += event({**chunk, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    out += event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    stream_options = request.data.get("stream_options")
    if isinstance(stream_options, dict) and stream_options.get("include_usage"):
        out += event({**chunk, "choices": [], "usage": usage})
    out += DONE_EVENT
    return SSE_CONTENT_TYPE, bytes(out)
