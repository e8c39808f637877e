"""Chat Completions bodies rendered for people: a request as the conversation turn by turn
and its tools; an answer (JSON or SSE) as the assembled text, reasoning, tool calls with
their arguments reassembled, finish_reason, usage and errors. Pure: the content view
(contentview.py) shows what these functions return."""

import dataclasses
import json
from typing import Any

RULE = "──"
# A long tool result or system prompt is cut in the view (the raw view keeps it whole).
MAX_PART = 4000


def is_chat_request(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("messages"), list)


def _text_of(content: Any) -> str:
    """A message's content: a string, or the text of its parts (images named)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                kind = part.get("type")
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind:
                    parts.append(f"[{kind}]")
            else:
                parts.append(str(part))
        return "\n".join(parts)
    return json.dumps(content, ensure_ascii=False)


def _cut(text: str, limit: int = MAX_PART) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n… ({len(text) - limit} more characters; the raw view has them)"


def _arguments(arguments: Any) -> str:
    """Tool-call arguments as compact JSON when they parse, else as sent."""
    if isinstance(arguments, str):
        try:
            return json.dumps(json.loads(arguments), ensure_ascii=False)
        except ValueError:
            return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _tool_call_line(call: Any) -> str:
    if not isinstance(call, dict):
        return f"  → tool call {call!r}"
    function = call.get("function") or {}
    name = function.get("name") or "?"
    return f"  → tool call {name} ({call.get('id') or '-'}): {_arguments(function.get('arguments', ''))}"


def _parameters(schema: Any) -> str:
    """`path: string*, limit: integer` (* = required)."""
    if not isinstance(schema, dict):
        return ""
    required = set(schema.get("required") or ())
    properties = schema.get("properties") or {}
    if not isinstance(properties, dict):
        return ""
    out = []
    for name, spec in properties.items():
        kind = spec.get("type", "?") if isinstance(spec, dict) else "?"
        out.append(f"{name}: {kind if isinstance(kind, str) else '|'.join(map(str, kind))}{'*' if name in required else ''}")
    return ", ".join(out)


def render_request(data: dict) -> str:
    """The conversation turn by turn, then the tools by name with their parameters."""
    settings = {k: v for k, v in data.items() if k not in ("messages", "tools") and not isinstance(v, (dict, list))}
    lines = ["  ".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in settings.items())]
    for message in data.get("messages") or ():
        if not isinstance(message, dict):
            lines += [f"{RULE} ? {RULE}", repr(message)]
            continue
        role = str(message.get("role", "?"))
        title = role + (f" ({message['tool_call_id']})" if message.get("tool_call_id") else "")
        title += f" {message['name']}" if isinstance(message.get("name"), str) else ""
        lines.append(f"{RULE} {title} {RULE}")
        if text := _text_of(message.get("content")):
            lines.append(_cut(text))
        for field in ("reasoning_content", "reasoning"):
            if isinstance(message.get(field), str) and message[field]:
                lines.append(f"  (reasoning) {_cut(message[field], 400)}")
        for call in message.get("tool_calls") or ():
            lines.append(_tool_call_line(call))
    tools = [t for t in data.get("tools") or () if isinstance(t, dict)]
    if tools:
        lines.append(f"{RULE} tools ({len(tools)}) {RULE}")
        for tool in tools:
            function = tool.get("function") or {}
            described = (function.get("description") or "").strip().split("\n", 1)[0][:100]
            lines.append(f"{function.get('name', '?')}({_parameters(function.get('parameters'))})"
                         + (f" — {described}" if described else ""))
    return "\n".join(lines)


@dataclasses.dataclass
class ToolCall:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclasses.dataclass
class Answer:
    """An answer put back together from its events (or read from one JSON body)."""

    model: str = ""
    text: str = ""
    reasoning: str = ""
    tool_calls: dict[int, ToolCall] = dataclasses.field(default_factory=dict)
    finish_reason: str = ""
    usage: dict | None = None
    errors: list[str] = dataclasses.field(default_factory=list)
    events: int = 0
    done: bool = False

    def add_delta(self, delta: dict) -> None:
        if isinstance(delta.get("content"), str):
            self.text += delta["content"]
        for field in ("reasoning_content", "reasoning"):
            if isinstance(delta.get(field), str):
                self.reasoning += delta[field]
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            index = call.get("index", len(self.tool_calls))
            slot = self.tool_calls.setdefault(index, ToolCall(index))
            slot.id = call.get("id") or slot.id
            function = call.get("function") or {}
            slot.name = function.get("name") or slot.name
            if isinstance(function.get("arguments"), str):
                slot.arguments += function["arguments"]

    def add_payload(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        self.model = payload.get("model") or self.model
        if (error := payload.get("error")) is not None:
            self.errors.append(_error_text(error))
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            # A chunk has a delta, a completion a message: both read the same way.
            message = choice.get("delta") if isinstance(choice.get("delta"), dict) else choice.get("message")
            if isinstance(message, dict):
                self.add_delta({**message, "tool_calls": [
                    {"index": i, **c} if isinstance(c, dict) and "index" not in c else c
                    for i, c in enumerate(message.get("tool_calls") or ())
                ]})
            self.finish_reason = choice.get("finish_reason") or self.finish_reason


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        code = f" [{error.get('code')}]" if error.get("code") else ""
        return f"{error.get('message') or error.get('type') or 'error'}{code}"
    return str(error)


def assemble(body: bytes) -> Answer | None:
    """An answer from a JSON completion or an SSE stream (complete events only; a cut last
    event is ignored). None when the body is neither."""
    answer = Answer()
    stripped = body.lstrip()
    if stripped.startswith(b"{"):
        try:
            payload = json.loads(stripped)
        except ValueError:
            return None
        if not isinstance(payload, dict) or not ("choices" in payload or "error" in payload):
            return None  # JSON, but not a completion (the JSON view shows it)
        answer.add_payload(payload)
        answer.done = True
        return answer
    seen = False
    for line in body.split(b"\n"):
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        seen = True
        data = line[5:].strip()
        if data == b"[DONE]":
            answer.done = True
            continue
        try:
            payload = json.loads(data)
        except ValueError:
            continue
        answer.events += 1
        answer.add_payload(payload)
    return answer if seen else None


def render_answer(answer: Answer, streamed: bool) -> str:
    lines = []
    if streamed:
        lines.append(f"{answer.events} events" + ("" if answer.done else ", no [DONE] (cut short or still running)")
                     + (f", model {answer.model}" if answer.model else ""))
    elif answer.model:
        lines.append(f"model {answer.model}")
    if answer.reasoning:
        lines += [f"{RULE} reasoning {RULE}", _cut(answer.reasoning)]
    if answer.text:
        lines += [f"{RULE} text {RULE}", answer.text]
    if answer.tool_calls:
        lines.append(f"{RULE} tool calls ({len(answer.tool_calls)}) {RULE}")
        for call in sorted(answer.tool_calls.values(), key=lambda c: c.index):
            lines.append(f"#{call.index} {call.name or '?'} ({call.id or '-'})")
            lines.append(f"  {_arguments(call.arguments)}")
    lines.append(f"finish_reason: {answer.finish_reason or '-'}")
    if answer.usage:
        usage = answer.usage
        lines.append(f"usage: in {usage.get('prompt_tokens', '?')} out {usage.get('completion_tokens', '?')}"
                     f" total {usage.get('total_tokens', '?')}")
    else:
        lines.append("usage: n/a")
    for error in answer.errors:
        lines += [f"{RULE} error {RULE}", error]
    return "\n".join(lines)


def render_chat_body(body: bytes, is_request: bool) -> str | None:
    """What the chat view shows for a body, or None when it is not chat traffic."""
    if is_request:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        return render_request(data) if is_chat_request(data) else None
    answer = assemble(body)
    if answer is None:
        return None
    return render_answer(answer, streamed=not body.lstrip().startswith(b"{"))
