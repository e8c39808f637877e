"""Strict provider simulators: fake upstreams (FakeUpstream behaviours) that validate what
each real provider validates and answer with its real error shapes and texts, so a test
can show an OpenCode request failing without the preset and succeeding with it.

What each one checks, and the texts, come from shared/notes/providers.md (sections 2-3):
- OpenAI gpt-5: `max_tokens`, temperature other than 1, top_p, penalties, stop, logit_bias;
- DeepSeek: max_tokens over the model's range, non-function tools, json_schema, image
  parts, and in thinking mode a missing `reasoning_content` on any assistant message;
- GLM: tool_choice other than auto, no user message, temperature outside [0, 1], top_p 1,
  max_completion_tokens; errors as `{"error": {"code": "1214", "message": ...}}`;
- MiniMax: more than one system message, temperature outside (0, 1], response_format,
  tools without parameters; errors as HTTP 200 with `base_resp.status_code` 2013;
- Kimi: k2.5+/thinking models take only temperature 1 (and top_p 0.95), tool_choice
  "required" is unsupported, thinking-mode tool-call messages need `reasoning_content`.

A valid request gets a normal answer (JSON or SSE as asked), with `reasoning_content`
when the model thinks, and the next tool call of `plan` (or `tool_call`) while the
conversation has fewer tool results than the plan has steps. `fail` makes one answer a classified failure instead (quota, rate limit,
error-first stream) for the answer-classification tests.
"""

import json
from fnmatch import fnmatchcase

from fakeupstream import Received, Steps, http_head, json_answer, sse_answer


def openai_error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None) -> Steps:
    return json_answer(status, {"error": {"message": message, "type": type_, "param": param, "code": code}})


class Simulator:
    """Base: subclasses list what the provider refuses in `problems`."""

    name = "simulator"

    def __init__(self, tool_call: tuple[str, str] | None = None, reasoning: str = "", fail: str = "",
                 plan: list[tuple[str, str, str]] | None = None) -> None:
        self.reasoning = reasoning  # the reasoning a thinking model sends with each answer
        # The tool calls to make, one per step: (tool name, JSON arguments, reasoning sent
        # with it; "" for none, as DeepSeek sometimes does). The answer comes after them.
        self.plan = plan if plan is not None else ([(*tool_call, reasoning)] if tool_call else [])
        self.fail = fail
        self.refused: list[Steps] = []
        self.sent_reasoning: dict[str, str] = {}  # tool-call id -> reasoning sent with it
        self.calls = 0

    def __call__(self, received: Received) -> Steps:
        try:
            body = received.json
        except ValueError:
            return openai_error(400, "We could not parse the JSON body of your request.")
        if self.fail:
            return self.failure(self.fail, body)
        refusal = self.problems(body)
        if refusal is not None:
            self.refused.append(refusal)
            return refusal
        return self.answer(body)

    def problems(self, body: dict) -> Steps | None:
        return None

    def thinks(self, body: dict) -> bool:
        return bool(self.reasoning)

    def failure(self, kind: str, body: dict) -> Steps:
        raise ValueError(f"{self.name} cannot fail with {kind!r}")

    # --- answers --------------------------------------------------------------------------

    def answer(self, body: dict) -> Steps:
        model = body.get("model", "?")
        messages = body.get("messages") or []
        call = None
        reasoning = self.reasoning
        step = sum(1 for m in messages if m.get("role") == "tool")
        if body.get("tools") and step < len(self.plan):
            name, arguments, reasoning = self.plan[step]
            self.calls += 1
            call = {"id": f"call_{self.name}_{self.calls}", "type": "function",
                    "function": {"name": name, "arguments": arguments}}
        reasoning = reasoning if self.thinks(body) else ""
        if call and reasoning:
            self.sent_reasoning[call["id"]] = reasoning
        text = "" if call else f"answer from {self.name}"
        if body.get("stream"):
            return sse_answer(self.events(model, reasoning, text, call))
        message = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning
        if call:
            message["tool_calls"] = [call]
        return json_answer(200, {
            "id": "chatcmpl-sim", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if call else "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        })

    def events(self, model: str, reasoning: str, text: str, call: dict | None) -> list[bytes]:
        def ev(delta, finish=None):
            return b"data: " + json.dumps({
                "id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": 1, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }).encode() + b"\n\n"

        out = [ev({"role": "assistant", "content": ""})]
        # Reasoning in pieces, as thinking models stream it.
        out += [ev({"reasoning_content": reasoning[i:i + 7]}) for i in range(0, len(reasoning), 7)]
        if text:
            out += [ev({"content": text[i:i + 5]}) for i in range(0, len(text), 5)]
        if call:
            arguments = call["function"]["arguments"]
            out.append(ev({"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                           "function": {"name": call["function"]["name"], "arguments": ""}}]}))
            out += [ev({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + 9]}}]})
                    for i in range(0, len(arguments), 9)]
        out.append(ev({}, "tool_calls" if call else "stop"))
        out.append(b'data: {"id": "chatcmpl-sim", "object": "chat.completion.chunk", "created": 1, "model": "'
                   + model.encode() + b'", "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}\n\n')
        out.append(b"data: [DONE]\n\n")
        return out


def _assistants(body: dict):
    for index, message in enumerate(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            yield index, message


def _has_images(body: dict) -> bool:
    return any(
        isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
        for m in body.get("messages") or []
    )


class OpenAI(Simulator):
    name = "openai"

    def problems(self, body: dict) -> Steps | None:
        model = body.get("model", "")
        if not (fnmatchcase(model, "gpt-5*") and not model.startswith("gpt-5-chat")):
            return None
        if "max_tokens" in body:
            return openai_error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                     "Use 'max_completion_tokens' instead.", param="max_tokens", code="unsupported_parameter")
        if "temperature" in body and body["temperature"] != 1:
            return openai_error(400, f"Unsupported value: 'temperature' does not support {body['temperature']} with this "
                                     "model. Only the default (1) value is supported.", param="temperature", code="unsupported_value")
        for name in ("top_p", "presence_penalty", "frequency_penalty", "stop", "logit_bias"):
            if name in body:
                return openai_error(400, f"Unsupported parameter: '{name}' is not supported with this model.",
                                    param=name, code="unsupported_parameter")
        return None

    def failure(self, kind: str, body: dict) -> Steps:
        if kind == "insufficient_quota":
            return openai_error(429, "You exceeded your current quota, please check your plan and billing details.",
                                type_="insufficient_quota", code="insufficient_quota")
        if kind == "overloaded":
            return openai_error(503, "The server is overloaded or not ready yet.", type_="server_error")
        return super().failure(kind, body)


class DeepSeek(Simulator):
    name = "deepseek"
    MAX_TOKENS = {"deepseek-chat": 8192, "deepseek-reasoner": 65536}

    def thinks(self, body: dict) -> bool:
        thinking = body.get("thinking")
        return body.get("model") == "deepseek-reasoner" or (isinstance(thinking, dict) and thinking.get("type") == "enabled")

    def problems(self, body: dict) -> Steps | None:
        def invalid(message: str, status: int = 400) -> Steps:
            return openai_error(status, message, code="invalid_request_error")

        limit = self.MAX_TOKENS.get(body.get("model"), 8192)
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, int) and not 1 <= max_tokens <= limit:
            return invalid(f"Invalid max_tokens value, the valid range of max_tokens is [1, {limit}]")
        for tool in body.get("tools") or []:
            if tool.get("type") != "function":
                return invalid(f"Failed to deserialize the JSON body into the target type: tools[0]: unknown "
                               f"variant `{tool.get('type')}`, expected `function`", 422)
        response_format = body.get("response_format")
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            return invalid("This response_format type is unavailable now", 422)
        if _has_images(body):
            return invalid("Failed to deserialize the JSON body into the target type: messages[1]: unknown "
                           "variant `image_url`, expected `text`", 422)
        if self.thinks(body):
            for index, message in _assistants(body):
                if not message.get("reasoning_content"):
                    return invalid(f"Missing `reasoning_content` field in the assistant message at message index "
                                   f"{index}. For more information, please refer to "
                                   "https://api-docs.deepseek.com/guides/thinking_mode#tool-calls")
        return None

    def failure(self, kind: str, body: dict) -> Steps:
        if kind == "insufficient_balance":
            return openai_error(402, "Insufficient Balance", type_="unknown_error", code="invalid_request_error")
        if kind == "overloaded":
            return openai_error(503, "Server overloaded, please try again later.", type_="server_error")
        return super().failure(kind, body)


def glm_error(status: int, code: str, message: str) -> Steps:
    return json_answer(status, {"error": {"code": code, "message": message}})


class GLM(Simulator):
    name = "glm"

    def problems(self, body: dict) -> Steps | None:
        if body.get("tool_choice", "auto") != "auto":
            return glm_error(400, "1214", "Tool choice must be auto")
        if "max_completion_tokens" in body:
            return glm_error(400, "1210", "Invalid API parameter, please check the documentation.")
        messages = body.get("messages") or []
        if not any(m.get("role") == "user" for m in messages):
            return glm_error(400, "1214", "The messages parameter is illegal. Please check the documentation.")
        if any(m.get("role") == "developer" for m in messages):
            return glm_error(400, "1214", "The messages parameter is illegal. Please check the documentation.")
        temperature, top_p = body.get("temperature"), body.get("top_p")
        if isinstance(temperature, (int, float)) and not 0 <= temperature <= 1:
            return glm_error(400, "1214", "temperature参数非法。请检查文档。")
        if isinstance(top_p, (int, float)) and not 0 < top_p < 1:
            return glm_error(400, "1214", "top_p参数非法。请检查文档。")
        return None

    def failure(self, kind: str, body: dict) -> Steps:
        if kind == "1113":
            return glm_error(429, "1113", "余额不足或无可用资源包,请充值。")
        if kind == "1302":
            return glm_error(429, "1302", "您当前使用该API的并发数过高，请降低并发，或联系客服增加限额。")
        return super().failure(kind, body)


def minimax_error(code: int, message: str) -> Steps:
    """MiniMax reports request errors with HTTP 200 and base_resp."""
    return json_answer(200, {"id": "", "choices": None, "created": 0, "model": "", "object": "chat.completion",
                             "base_resp": {"status_code": code, "status_msg": message}})


class MiniMax(Simulator):
    name = "minimax"

    def problems(self, body: dict) -> Steps | None:
        messages = body.get("messages") or []
        if sum(1 for m in messages if m.get("role") == "system") > 1:
            return minimax_error(2013, "invalid params, invalid chat setting")
        temperature = body.get("temperature")
        if isinstance(temperature, (int, float)) and not 0 < temperature <= 1:
            return minimax_error(2013, "invalid params, temperature must be in (0, 1]")
        if "response_format" in body:
            return minimax_error(2013, "invalid params, response_format is not supported")
        for tool in body.get("tools") or []:
            if not (tool.get("function") or {}).get("parameters"):
                return minimax_error(2013, "invalid params, function parameters is empty")
        return None

    def failure(self, kind: str, body: dict) -> Steps:
        if kind == "1008":
            return minimax_error(1008, "insufficient balance")
        if kind == "error_first_stream":
            head = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
            event = b'data: {"base_resp": {"status_code": 1002, "status_msg": "rate limit exceeded(RPM)"}}\n\n'
            return [("send", head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event))]
        return super().failure(kind, body)


class Kimi(Simulator):
    name = "kimi"
    FIXED = ("kimi-k2.5*", "kimi-k2.6*", "kimi-k3*", "kimi-k2-thinking*")

    def fixed(self, body: dict) -> bool:
        return any(fnmatchcase(body.get("model", ""), glob) for glob in self.FIXED)

    def thinks(self, body: dict) -> bool:
        return bool(self.reasoning) and self.fixed(body)

    def problems(self, body: dict) -> Steps | None:
        if self.fixed(body):
            if "temperature" in body and body["temperature"] != 1:
                return openai_error(400, "invalid temperature: only 1 is allowed for this model")
            if "top_p" in body and body["top_p"] != 0.95:
                return openai_error(400, "invalid top_p: only 0.95 is allowed for this model")
        if body.get("tool_choice") == "required":
            return openai_error(400, "Invalid request: tool_choice 'required' is not supported")
        if self.thinks(body):
            for index, message in _assistants(body):
                if message.get("tool_calls") and not message.get("reasoning_content"):
                    return openai_error(400, "thinking is enabled but reasoning_content is missing in assistant "
                                             f"tool call message at index {index}")
        return None

    def failure(self, kind: str, body: dict) -> Steps:
        if kind in ("exceeded_current_quota_error", "rate_limit_reached_error", "engine_overloaded_error"):
            return openai_error(429, f"simulated {kind}", type_=kind)
        return super().failure(kind, body)


SIMULATORS = {"openai": OpenAI, "deepseek": DeepSeek, "glm": GLM, "minimax": MiniMax, "kimi": Kimi}
