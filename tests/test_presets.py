"""Presets through a real gateway against strict provider simulators (tests/simulators.py):
every error quoted in issue 8 is reproduced without the preset and cured with it; failover
between presets gives each attempt its own fixes only; reasoning passback from streams;
images; and, without a preset, the client's bytes with only the model changed."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import openai_like
from simulators import SIMULATORS, DeepSeek, Kimi

AUTH = {"Authorization": f"Bearer {PROXY_KEY}"}
READ_TOOL = {"type": "function", "function": {"name": "read", "description": "Read a file.",
                                                "parameters": {"type": "object", "properties": {"filePath": {"type": "string"}}}}}


def opencode_request(model: str, **changes) -> dict:
    """What OpenCode sends to a generic openai-compatible provider (providers.md, section 1)."""
    body = {
        "model": model, "max_tokens": 32000, "tool_choice": "auto", "stream": False,
        "messages": [{"role": "system", "content": "You are opencode."}, {"role": "user", "content": "read notes.txt"}],
        "tools": [READ_TOOL],
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


TOOL_TURN = [
    {"role": "system", "content": "You are opencode."},
    {"role": "user", "content": "read notes.txt"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "read", "arguments": "{\"filePath\": \"notes.txt\"}"}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": "the notes"},
]

# (provider, upstream model, request changes, status without the preset, quoted error text).
# MiniMax refuses inside an HTTP 200 (base_resp 2013): the gateway answers that as the 400 it is.
QUOTED_ERRORS = [
    ("openai", "gpt-5", {}, 400,
     "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead."),
    ("openai", "gpt-5", {"max_tokens": None, "temperature": 0}, 400,
     "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1) value is supported."),
    ("deepseek", "deepseek-chat", {}, 400, "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"),
    ("deepseek", "deepseek-reasoner", {"messages": TOOL_TURN}, 400,
     "Missing `reasoning_content` field in the assistant message at message index 2"),
    ("glm", "glm-4.6", {"tool_choice": "required"}, 400, "Tool choice must be auto"),
    ("glm", "glm-4.6", {"messages": [{"role": "system", "content": "You are opencode."}]}, 400,
     "The messages parameter is illegal"),
    ("minimax", "MiniMax-M2", {"messages": [{"role": "system", "content": "You are opencode."},
                                            {"role": "system", "content": "A plugin's rules."},
                                            {"role": "user", "content": "hi"}]}, 400, "invalid chat setting"),
    ("minimax", "MiniMax-M2", {"temperature": 0}, 400, "temperature must be in (0, 1]"),
    ("minimax", "MiniMax-M2", {"response_format": {"type": "json_object"}}, 400, "response_format is not supported"),
    ("kimi", "kimi-k2.5", {"temperature": 0.6}, 400, "invalid temperature: only 1 is allowed for this model"),
    ("kimi", "kimi-k2-0905-preview", {"tool_choice": "required"}, 400, "tool_choice 'required' is not supported"),
    ("kimi", "kimi-k2.5", {"messages": TOOL_TURN}, 400,
     "thinking is enabled but reasoning_content is missing in assistant tool call message at index 2"),
]


def post(gw, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30, **kwargs)


@pytest.mark.parametrize("provider, model, changes, status, quoted", QUOTED_ERRORS,
                         ids=[f"{c[0]}-{c[4][:30]}" for c in QUOTED_ERRORS])
def test_each_quoted_error_without_the_preset_is_cured_with_it(gateway, upstreams, provider, model, changes, status, quoted):
    simulator = SIMULATORS[provider](reasoning="I should look at the notes first.")
    up = upstreams(simulator)
    request = opencode_request(model, **changes)

    plain = gateway(config(channel(provider, up.url + "/v1")))
    refused = post(plain, request)
    assert refused.status_code == status, refused.text
    assert quoted in refused.json()["error"]["message"]
    assert len(simulator.refused) == 1

    fixed = gateway(config(channel(provider, up.url + "/v1", extra=f"preset: {provider}")))
    answer = post(fixed, request)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] in ("", f"answer from {provider}")
    assert len(simulator.refused) == 1  # the preset's request passed every check
    [flow] = [f for f in fixed.flows if f.request.path.endswith("/chat/completions")]
    assert "| fixes: " in flow.comment, flow.comment


def test_failover_between_presets_gives_each_attempt_its_own_fixes(gateway, upstreams):
    openai = SIMULATORS["openai"](fail="overloaded")
    deepseek = DeepSeek()
    up_openai, up_deepseek = upstreams(openai), upstreams(deepseek)
    gw = gateway(config(
        channel("openai", up_openai.url + "/v1", keys=(UPSTREAM_KEYS[0],), extra="preset: openai"),
        channel("deepseek", up_deepseek.url + "/v1", keys=(UPSTREAM_KEYS[1],),
                extra="preset: deepseek\nmodel_mapping: {gpt-5: deepseek-chat}"),
    ))
    request = opencode_request("gpt-5", temperature=0, messages=TOOL_TURN)

    response = post(gw, request)

    assert response.status_code == 200, response.text
    assert response.headers["x-ccx-channel"] == "deepseek"
    [to_openai] = up_openai.chats
    [to_deepseek] = up_deepseek.chats
    sent_openai, sent_deepseek = to_openai.json, to_deepseek.json
    # OpenAI's fixes only on OpenAI's attempt ...
    assert sent_openai["max_completion_tokens"] == 32000 and "max_tokens" not in sent_openai
    assert "temperature" not in sent_openai
    assert not any("reasoning_content" in m for m in sent_openai["messages"])
    # ... DeepSeek's only on DeepSeek's, starting again from the client's body.
    assert sent_deepseek["model"] == "deepseek-chat" and sent_deepseek["max_tokens"] == 8192
    assert "max_completion_tokens" not in sent_deepseek and sent_deepseek["temperature"] == 0
    assert sent_deepseek["messages"][2]["reasoning_content"] == " "  # never seen: the placeholder
    [flow] = [f for f in gw.flows if f.request.path.endswith("/chat/completions")]
    assert "fixes: max_tokens 32000→8192, +reasoning_content×1 (1 placeholder)" in flow.comment, flow.comment
    assert "max_completion_tokens" not in flow.comment
    assert json.loads(flow.request.content) == sent_deepseek  # the flow shows what went upstream


def stream_json(response: httpx.Response) -> tuple[str, str, list]:
    """(reasoning, text, tool calls) of an SSE answer."""
    reasoning = text = ""
    calls: list = []
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        for choice in json.loads(line[6:]).get("choices") or []:
            delta = choice.get("delta") or {}
            reasoning += delta.get("reasoning_content") or ""
            text += delta.get("content") or ""
            calls += [c for c in delta.get("tool_calls") or [] if c.get("id")]
    return reasoning, text, calls


@pytest.mark.parametrize("provider, model", [("deepseek", "deepseek-reasoner"), ("kimi", "kimi-k2.5")])
def test_streamed_reasoning_goes_back_on_the_next_turn_through_mitmdump(mitmdump, upstreams, provider, model):
    thought = f"The user wants notes.txt; {provider} should call read first. " * 3
    simulator = SIMULATORS[provider](tool_call=("read", '{"filePath": "notes.txt"}'), reasoning=thought)
    up = upstreams(simulator)
    gw = mitmdump(config(channel(provider, up.url + "/v1", extra=f"preset: {provider}")))
    first = opencode_request(model, stream=True, temperature=None)

    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=first, headers=AUTH, timeout=30) as response:
        response.read()
    reasoning, _, [call] = stream_json(response)
    assert reasoning == thought and response.status_code == 200

    # The client sends the tool call back without the reasoning (as OpenCode does when it
    # has none, or after compaction); an older turn whose reasoning the gateway never saw
    # gets the placeholder.
    history = [
        {"role": "system", "content": "You are opencode."},
        {"role": "user", "content": "earlier question"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_before_the_gateway", "type": "function",
                                                            "function": {"name": "read", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_before_the_gateway", "content": "old"},
        {"role": "user", "content": "read notes.txt"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call["id"], "type": "function", "function": {
            "name": "read", "arguments": '{"filePath": "notes.txt"}'}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "the notes say hi"},
    ]
    second = post(gw, opencode_request(model, messages=history, temperature=None))

    assert second.status_code == 200, second.text
    sent = up.chats[-1].json["messages"]
    assert sent[5]["reasoning_content"] == simulator.sent_reasoning[call["id"]] == thought
    assert sent[2]["reasoning_content"] == " "
    # What the client sent itself is never overwritten.
    history[5]["reasoning_content"] = "the client's own copy"
    post(gw, opencode_request(model, messages=history, temperature=None))
    assert up.chats[-1].json["messages"][5]["reasoning_content"] == "the client's own copy"
    assert not simulator.refused


def test_json_answers_are_remembered_too(gateway, upstreams):
    simulator = Kimi(tool_call=("read", "{}"), reasoning="thinking about it")
    up = upstreams(simulator)
    gw = gateway(config(channel("kimi", up.url + "/v1", extra="preset: kimi")))
    first = post(gw, opencode_request("kimi-k2.5")).json()["choices"][0]["message"]
    [call] = first["tool_calls"]
    turn = [*TOOL_TURN[:2], {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "x"}]
    assert post(gw, opencode_request("kimi-k2.5", messages=turn)).status_code == 200
    assert up.chats[-1].json["messages"][2]["reasoning_content"] == "thinking about it"


IMAGE_MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "what is in this picture?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]


def test_images_skip_channels_that_take_none(gateway, upstreams):
    deepseek = DeepSeek()
    up_deepseek, up_vision = upstreams(deepseek), upstreams(openai_like)
    request = opencode_request("deepseek-chat", messages=IMAGE_MESSAGES, max_tokens=100)

    plain = gateway(config(channel("deepseek", up_deepseek.url + "/v1")))
    refused = post(plain, request)
    assert refused.status_code == 422 and "unknown variant `image_url`" in refused.json()["error"]["message"]

    only = gateway(config(channel("deepseek", up_deepseek.url + "/v1", extra="preset: deepseek")))
    answer = post(only, request)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "images_not_supported" and error["type"] == "invalid_request_error"
    assert "deepseek (deepseek-chat): takes no images (preset deepseek)" in error["message"]
    assert len(up_deepseek.chats) == 1  # only the request without the preset got there

    both = gateway(config(channel("deepseek", up_deepseek.url + "/v1", extra="preset: deepseek"),
                          channel("vision", up_vision.url + "/v1")))
    served = post(both, request)
    assert served.status_code == 200 and served.headers["x-ccx-channel"] == "vision"
    assert len(up_deepseek.chats) == 1 and len(up_vision.chats) == 1
    [flow] = [f for f in both.flows if f.request.path.endswith("/chat/completions")]
    assert "deepseek (-): skipped: takes no images (preset deepseek)" in flow.comment, flow.comment
    # A request without images still goes to DeepSeek first.
    assert post(both, opencode_request("deepseek-chat", max_tokens=100)).headers["x-ccx-channel"] == "deepseek"


def test_channel_fixes_without_a_preset_scoped_by_model(gateway, upstreams):
    up = upstreams(openai_like)
    gw = gateway(config(channel("other", up.url + "/v1", extra="""
        fixes:
          drop_params: [logprobs]
          role_map: {developer: system}
          merge_system_messages: true
          set_params: {parallel_tool_calls: false}
          models:
            "big-*": {clamp: {max_tokens: {max: 1000}}}
    """)))
    body = opencode_request("big-1", logprobs=True, messages=[
        {"role": "system", "content": "a"}, {"role": "developer", "content": "b"}, {"role": "user", "content": "hi"}])
    assert post(gw, body).status_code == 200
    sent = up.chats[-1].json
    assert sent["messages"] == [{"role": "system", "content": "a\n\nb"}, {"role": "user", "content": "hi"}]
    assert sent["max_tokens"] == 1000 and sent["parallel_tool_calls"] is False and "logprobs" not in sent
    post(gw, {**body, "model": "small-1"})
    assert up.chats[-1].json["max_tokens"] == 32000  # the big-* layer is not for small-1


# --- without a preset: the client's bytes, only the model changed -------------------------

_json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.text(max_size=12)
_json = st.recursive(_json_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_spaces = st.sampled_from(["", " ", "  ", "\n", "\t "])


@st.composite
def client_bodies(draw):
    """A JSON object as some client may write it: any keys and values, any spacing, the
    model anywhere, non-ASCII escaped or not. Returns (the client's bytes, the bytes the
    upstream must receive)."""
    others = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "model"), _json, max_size=5))
    model_at = draw(st.integers(0, len(others)))
    ascii_only = draw(st.booleans())
    gap = draw(_spaces)

    def member(key: str, value_json: str) -> str:
        return gap + json.dumps(key, ensure_ascii=ascii_only) + gap + ":" + gap + value_json + gap

    members = [member(k, json.dumps(v, ensure_ascii=ascii_only)) for k, v in others.items()]

    def body(model: str) -> bytes:
        with_model = members[:model_at] + [member("model", json.dumps(model))] + members[model_at:]
        return ("{" + ",".join(with_model) + "}").encode()

    return body("client-model"), body("up-model")


@pytest.fixture(scope="module")
def plain_gateway(tmp_path_factory):
    """One gateway without preset for every example of the property test."""
    from fakeupstream import FakeUpstream
    from harness import InProcessGateway

    up = FakeUpstream(openai_like).start()
    path = tmp_path_factory.mktemp("plain") / "ccx.yaml"
    path.write_text(config(channel("plain", up.url + "/v1", extra="model_mapping: {client-model: up-model}")))
    gw = InProcessGateway(path).start()
    yield gw, up
    gw.stop()
    up.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=client_bodies())
def test_without_a_preset_the_upstream_gets_the_clients_bytes_with_only_the_model_changed(plain_gateway, bodies):
    gw, up = plain_gateway
    sent, expected = bodies
    response = httpx.post(gw.url + "/v1/chat/completions", content=sent, timeout=30,
                          headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert up.chats[-1].body == expected


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_the_reasoning_cache_stays_bounded_in_mitmdump(mitmdump, upstreams):
    """200 answers with ~0.9 MB of reasoning each (180 MB in all) through a real mitmdump:
    the cache keeps at most 32 MB, so the process grows far less than what passed."""
    thought = "a long chain of thought. " * 37_000  # ~0.9 MB
    simulator = DeepSeek(plan=[("read", "{}", thought)] * 1)
    up = upstreams(simulator)
    gw = mitmdump(config(channel("deepseek", up.url + "/v1", extra="preset: deepseek")))
    request = opencode_request("deepseek-reasoner", max_tokens=100)
    with httpx.Client(timeout=30) as client:
        def send() -> None:
            response = client.post(gw.url + "/v1/chat/completions", json=request, headers=AUTH)
            assert response.status_code == 200 and len(response.content) > 900_000
        for _ in range(10):
            send()
        before = rss_mb(gw.process.pid)
        for _ in range(200):
            send()
        grown = rss_mb(gw.process.pid) - before
    assert simulator.calls == 210 and not simulator.refused
    assert grown < 100, f"RSS grew {grown:.0f} MB for 180 MB of reasoning"
