"""Request bodies and pre-built answers shared by the fake upstream and the load generator."""

import json

MODEL = "gpt-5"             # what clients ask for
UPSTREAM_MODEL = "bench-up"  # what the gateway's first channel maps it to
ACCESS_KEY = "bench-access-key"


def small_body(stream: bool = False) -> bytes:
    return json.dumps({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "stream": stream,
    }, separators=(",", ":")).encode()


def _tool(i: int) -> dict:
    return {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": (f"Tool number {i}. " + "Reads, edits or searches files in the "
                            "workspace and reports what it found. " * 4),
            "parameters": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Absolute path of the file."},
                    "pattern": {"type": "string", "description": "A glob or regular expression."},
                    "limit": {"type": "number", "description": "Most lines to return."},
                    "offset": {"type": "number", "description": "First line to return."},
                },
                "required": ["path"],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        },
    }


def opencode_body(stream: bool = False) -> bytes:
    """~30 KB like OpenCode's requests via the ai-sdk: model first, ~10 KB system prompt,
    a short conversation, 20 tools."""
    system = ("You are opencode, an interactive CLI tool that helps users with software "
              "engineering tasks. Use the instructions below and the tools available to you. "
              "IMPORTANT: keep answers short; never guess URLs; follow the repository's style. ")
    system = (system * 50)[:10_000]
    messages = [{"role": "system", "content": system}]
    for i in range(4):
        messages.append({"role": "user", "content": f"Question {i}: " + "please look at src/app.ts and fix the bug. " * 12})
        messages.append({"role": "assistant", "content": f"Answer {i}: " + "I read the file and changed line 42. " * 20})
    data = {
        "model": MODEL,
        "max_tokens": 32000,
        "temperature": 0,
        "messages": messages,
        "tools": [_tool(i) for i in range(20)],
        "tool_choice": "auto",
        "stream": stream,
    }
    if stream:
        data["stream_options"] = {"include_usage": True}
    return json.dumps(data, separators=(",", ":")).encode()


COMPLETION = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": UPSTREAM_MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi! How can I help you today?"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}, separators=(",", ":")).encode()

EVENT = b"data: " + json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": UPSTREAM_MODEL,
    "choices": [{"index": 0, "delta": {"content": "token "}, "finish_reason": None}],
}, separators=(",", ":")).encode() + b"\n\n"
LAST_EVENTS = b"data: " + json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": UPSTREAM_MODEL,
    "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"


def request_bytes(port: int, body: bytes, *, events: int = 0, pause_ms: int = 0, session: str = "") -> bytes:
    """A complete keep-alive POST; `events` > 0 asks the fake upstream for an SSE answer;
    `session` adds an `x-session-id` header as OpenCode sends it."""
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Authorization: Bearer {ACCESS_KEY}",
        "Content-Type: application/json",
        "Accept: application/json" if not events else "Accept: text/event-stream",
        # bench/upstream.py reads its instructions here (an allowlisted header).
        "User-Agent: ccx-bench" + (f" events={events}" if events else "") + (f" pause-ms={pause_ms}" if pause_ms else ""),
        f"Content-Length: {len(body)}",
    ]
    if session:
        head.append(f"x-session-id: {session}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
