"""The request fixes, presets, reasoning cache and per-attempt body: pure functions, called
directly (the gateway-level proof is in test_presets.py)."""

import json
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccx_addon import fixes
from ccx_addon.body import parse_chat_request
from ccx_addon.config import ConfigError, parse_config
from ccx_addon.fixes import Clamp, FixSpec, apply_fixes, merge
from ccx_addon.presets import matches, resolve
from ccx_addon.reasoning import ReasoningCache, ReasoningObserver, capture_completion, message_keys
from ccx_addon.rewrite import build_attempt_body as attempt_body, fixes_for, image_refusals
from ccx_addon.routing import plan_routes


# --- one fix at a time ------------------------------------------------------------------


def test_drop_params_labels_only_what_was_there():
    data = {"top_p": 0.9, "stop": None, "model": "m"}
    assert fixes.drop_params(data, ("top_p", "stop", "logit_bias")) == ["−top_p", "−stop"]
    assert data == {"model": "m"}


def test_drop_unless_keeps_the_allowed_value():
    data = {"temperature": 1}
    assert fixes.drop_unless(data, (("temperature", 1),)) == []
    assert data == {"temperature": 1}
    data = {"temperature": 0.5}
    assert fixes.drop_unless(data, (("temperature", 1),)) == ["−temperature"]
    assert data == {}


def test_rename_params_moves_the_value_or_drops_the_duplicate():
    data = {"max_tokens": 32000}
    assert fixes.rename_params(data, (("max_tokens", "max_completion_tokens"),)) == ["max_tokens→max_completion_tokens"]
    assert data == {"max_completion_tokens": 32000}
    data = {"max_tokens": 1, "max_completion_tokens": 2}
    assert fixes.rename_params(data, (("max_tokens", "max_completion_tokens"),)) == ["−max_tokens"]
    assert data == {"max_completion_tokens": 2}


def test_set_and_default_params():
    data = {"a": 1}
    assert fixes.set_params(data, (("a", 1), ("b", {"x": 1}))) == ["b={…}"]
    assert fixes.default_params(data, (("a", 5), ("c", True))) == ["+c"]
    assert data == {"a": 1, "b": {"x": 1}, "c": True}


def test_clamp_params_moves_numbers_to_the_bounds():
    data = {"max_tokens": 32000, "temperature": 0, "top_p": "high", "n": True}
    limits = (("max_tokens", Clamp(1, 8192)), ("temperature", Clamp(0.01, 1)), ("top_p", Clamp(0, 1)), ("n", Clamp(2, 3)))
    assert fixes.clamp_params(data, limits) == ["max_tokens 32000→8192", "temperature 0→0.01"]
    assert data == {"max_tokens": 8192, "temperature": 0.01, "top_p": "high", "n": True}


def test_map_values_exact_then_any_and_null_drops():
    data = {"tool_choice": "required", "reasoning_effort": "none"}
    maps = (("tool_choice", (("required", "auto"),)), ("reasoning_effort", (("none", None),)))
    assert fixes.map_values(data, maps) == ["tool_choice required→auto", "−reasoning_effort"]
    assert data == {"tool_choice": "auto"}
    data = {"tool_choice": {"type": "function", "function": {"name": "x"}}}
    assert fixes.map_values(data, (("tool_choice", (("*", "auto"),)),)) == ["tool_choice {…}→auto"]
    data = {"tool_choice": "auto"}
    assert fixes.map_values(data, (("tool_choice", (("*", "auto"),)),)) == []


def test_map_roles():
    data = {"messages": [{"role": "developer", "content": "a"}, {"role": "developer", "content": "b"}, {"role": "user"}]}
    assert fixes.map_roles(data, (("developer", "system"),)) == ["role developer→system×2"]
    assert [m["role"] for m in data["messages"]] == ["system", "system", "user"]


def test_merge_system_messages_joins_them_where_the_first_was():
    data = {"messages": [
        {"role": "system", "content": "You are opencode."},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": [{"type": "text", "text": "Plugin rules."}]},
    ]}
    assert fixes.merge_system_messages(data, True) == ["merged 2 system messages"]
    assert data["messages"] == [
        {"role": "system", "content": "You are opencode.\n\nPlugin rules."}, {"role": "user", "content": "hi"},
    ]
    one = {"messages": [{"role": "system", "content": "x"}]}
    assert fixes.merge_system_messages(one, True) == [] and fixes.merge_system_messages(data, False) == []


def test_ensure_user_turn_after_the_system_messages():
    data = {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}
    assert fixes.ensure_user_turn(data, True) == ["+user turn"]
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
    assert fixes.ensure_user_turn(data, True) == []


def test_flatten_content_only_text_arrays_of_the_roles():
    text = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    image = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "data:"}}]
    data = {"messages": [{"role": "tool", "content": text}, {"role": "user", "content": list(text)}, {"role": "assistant", "content": image}]}
    assert fixes.flatten_content(data, ("tool", "assistant")) == ["flattened content×1"]
    assert data["messages"][0]["content"] == "ab" and data["messages"][1]["content"] == text
    assert data["messages"][2]["content"] == image


def test_function_tools_only():
    data = {"tools": [{"type": "function", "function": {"name": "a"}}, {"type": "web_search"}]}
    assert fixes.function_tools_only(data, True) == ["−tools×1 (not function)"]
    assert len(data["tools"]) == 1
    data = {"tools": [{"type": "web_search"}], "tool_choice": "auto"}
    assert fixes.function_tools_only(data, True) == ["−tools×1 (not function)", "−tool_choice"]
    assert data == {}


def test_json_schema_to_json_object_and_tool_parameters():
    data = {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
            "tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b", "parameters": {"type": "object"}}}]}
    assert fixes.json_schema_to_json_object(data, True) == ["response_format json_schema→json_object"]
    assert data["response_format"] == {"type": "json_object"}
    assert fixes.tool_parameters(data, True) == ["+tool parameters×1"]
    assert data["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}


def test_restore_reasoning_never_overwrites_and_uses_placeholders():
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_2"}]},
        {"role": "assistant", "content": "client's own", "reasoning_content": "the client's text"},
        {"role": "assistant", "content": "plain answer"},
    ]
    data = {"messages": [dict(m) for m in messages]}
    remembered = {"call_1": "I should read the file."}

    def recall(message):
        calls = message.get("tool_calls") or [{}]
        return remembered.get(calls[0].get("id"))

    assert fixes.restore_reasoning(data, "tool_calls", " ", recall) == ["+reasoning_content×2 (1 placeholder)"]
    out = data["messages"]
    assert out[0]["reasoning_content"] == "I should read the file."
    assert out[1]["reasoning_content"] == " "
    assert out[2]["reasoning_content"] == "the client's text"
    assert "reasoning_content" not in out[3]  # scope: tool-call messages only
    data = {"messages": [dict(m) for m in messages]}
    assert fixes.restore_reasoning(data, "all", None, recall) == ["+reasoning_content×1"]
    assert "reasoning_content" not in data["messages"][3]  # no placeholder: left out


def test_apply_fixes_order_rename_before_drop_and_set_last():
    spec = FixSpec(rename_params=(("a", "b"),), drop_params=("a",), set_params=(("c", 1),), default_params=(("c", 2),))
    data = {"a": 1}
    assert apply_fixes(data, spec) == ["a→b", "+c", "c=1"]
    assert data == {"b": 1, "c": 1}


def test_merge_later_layers_win_and_drops_add_up():
    a = FixSpec(drop_params=("x",), clamp=(("max_tokens", Clamp(1, 8192)),), merge_system_messages=True,
                value_map=(("tool_choice", (("required", "auto"),)),))
    b = FixSpec(drop_params=("y",), clamp=(("max_tokens", Clamp(1, 65536)),), merge_system_messages=None,
                value_map=(("tool_choice", (("none", "auto"),)),), images=False)
    merged = merge(a, b)
    assert merged.drop_params == ("x", "y")
    assert merged.clamp == (("max_tokens", Clamp(1, 65536)),)
    assert merged.merge_system_messages is True and merged.images is False
    assert dict(merged.value_map)["tool_choice"] == (("required", "auto"), ("none", "auto"))


# --- presets ----------------------------------------------------------------------------


def test_globs_with_excludes():
    assert matches("gpt-5* !gpt-5-chat*", "GPT-5-mini")
    assert not matches("gpt-5* !gpt-5-chat*", "gpt-5-chat-latest")
    assert matches("*", "anything") and not matches("o[134]*", "omni")


OPENCODE_BODY = {
    "model": "m", "max_tokens": 32000, "temperature": 0, "top_p": 1, "stop": ["x"], "presence_penalty": 0,
    "tool_choice": "required", "stream": True,
    "messages": [
        {"role": "system", "content": "You are opencode."}, {"role": "system", "content": "Plugin."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "read", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "file"},
    ],
    "tools": [{"type": "function", "function": {"name": "read"}}],
    "response_format": {"type": "json_schema", "json_schema": {}},
}


@pytest.mark.parametrize("preset, model, expected", [
    ("openai", "gpt-5", ["max_tokens→max_completion_tokens", "−top_p", "−presence_penalty", "−stop", "−temperature"]),
    ("openai", "gpt-5-chat-latest", []),
    ("openai", "gpt-4o", []),
    ("deepseek", "deepseek-chat", ["max_tokens 32000→8192", "response_format json_schema→json_object",
                                   "+reasoning_content×1 (1 placeholder)"]),
    ("deepseek", "deepseek-reasoner", ["+reasoning_content×1 (1 placeholder)", "response_format json_schema→json_object"]),
    ("glm", "glm-4.6", ["merged 2 system messages", "tool_choice required→auto", "top_p 1→0.99"]),
    ("minimax", "MiniMax-M2", ["merged 2 system messages", "−response_format", "temperature 0→0.01", "+tool parameters×1"]),
    ("kimi", "kimi-k2.5", ["tool_choice required→auto", "−temperature", "−top_p", "−presence_penalty",
                           "+reasoning_content×1 (1 placeholder)"]),
    ("kimi", "kimi-k2-0905-preview", ["tool_choice required→auto"]),
])
def test_each_preset_fixes_opencode_requests(preset, model, expected):
    spec = resolve(preset, (), model)
    data = json.loads(json.dumps(OPENCODE_BODY))
    labels = apply_fixes(data, spec) if spec else []
    assert sorted(labels) == sorted(expected)


def test_channel_fixes_come_after_the_preset_and_models_after_them():
    overrides = (("*", FixSpec(clamp=(("max_tokens", Clamp(None, 4096)),))),
                 ("deepseek-chat", FixSpec(clamp=(("max_tokens", Clamp(None, 2048)),))))
    assert dict(resolve("deepseek", overrides, "deepseek-chat").clamp)["max_tokens"] == Clamp(None, 2048)
    assert dict(resolve("deepseek", overrides, "deepseek-reasoner").clamp)["max_tokens"] == Clamp(None, 4096)
    assert resolve("", (), "x") is None


# --- config -----------------------------------------------------------------------------

CHANNEL = """
proxy_access_keys: ["pk"]
channels:
  - name: a
    base_url: https://x/v1
    api_keys: ["k"]
"""


def parse_with(extra: str):
    return parse_config(CHANNEL + textwrap.indent(textwrap.dedent(extra), "    "), "c.yaml", {})


def test_config_parses_every_override():
    channel = parse_with("""
        preset: deepseek
        fixes:
          drop_params: [logprobs]
          drop_unless: {temperature: 1}
          rename_params: {max_completion_tokens: max_tokens}
          set_params: {thinking: {type: enabled}}
          default_params: {top_p: 0.9}
          clamp: {max_tokens: {max: 100}, temperature: {min: 0.1, max: 1}}
          value_map: {tool_choice: {required: auto, none: null}}
          role_map: {developer: system}
          merge_system_messages: true
          ensure_user_turn: "yes"
          flatten_content: [tool]
          images: true
          reasoning_passback: {scope: tool_calls, placeholder: "."}
          models:
            "big-* !big-lite*": {clamp: {max_tokens: {max: 9000}}}
    """).channels[0]
    base = channel.fixes[0][1]
    assert [(k, fixes.thaw(v)) for k, v in base.set_params] == [("thinking", {"type": "enabled"})]
    data = {}
    fixes.set_params(data, base.set_params)
    data["thinking"]["type"] = "changed"  # each body gets its own copy
    assert fixes.set_params(data, base.set_params) == ["thinking={…}"]
    assert base.value_map == (("tool_choice", (("required", "auto"), ("none", None))),)
    assert base.clamp == (("max_tokens", Clamp(None, 100)), ("temperature", Clamp(0.1, 1)))
    assert base.ensure_user_turn is True and base.reasoning_passback == "tool_calls" and base.reasoning_placeholder == "."
    assert channel.fixes[1][0] == "big-* !big-lite*"
    assert dict(fixes_for(channel, "big-1").clamp)["max_tokens"] == Clamp(None, 9000)
    assert fixes_for(channel, "big-1").takes_images  # the channel says true over the preset's false
    assert dict(fixes_for(channel, "big-lite").clamp)["max_tokens"] == Clamp(None, 100)


@pytest.mark.parametrize("extra, where", [
    ("fixes: {drop: [x]}", "channels[0].fixes.drop: unknown field"),
    ("fixes: {drop_params: logprobs}", "channels[0].fixes.drop_params: must be a list"),
    ("fixes: {clamp: {max_tokens: {max: 1, min: 5}}}", "channels[0].fixes.clamp.max_tokens: min is larger"),
    ("fixes: {clamp: {max_tokens: 100}}", "channels[0].fixes.clamp.max_tokens: must be a mapping"),
    ("fixes: {role_map: {developer: boss}}", "unknown role 'boss'"),
    ("fixes: {reasoning_passback: {scope: maybe}}", "reasoning_passback.scope: must be one of"),
    ("fixes: {models: {'a*': {bogus: 1}}}", "channels[0].fixes.models.a*.bogus: unknown field"),
    ("fixes: {value_map: {tool_choice: auto}}", "value_map.tool_choice: must be a mapping"),
])
def test_config_refuses_bad_overrides_with_file_line_and_field(extra, where):
    with pytest.raises(ConfigError, match="^c.yaml, line 7, ") as caught:
        parse_with(extra)
    assert where in str(caught.value)


# --- the attempt body -------------------------------------------------------------------


def routes_for(config_text: str, model: str):
    return plan_routes(parse_config(config_text, "c.yaml", {}), model)


def test_without_preset_only_the_model_changes_byte_for_byte():
    raw = b'{"model" :  "gpt-5", "max_tokens":32000,  "temperature": 0.0, "x": "\\u00e9"}'
    route = routes_for(CHANNEL + '    model_mapping: {gpt-5: up}\n', "gpt-5").routes[0]
    body, labels = attempt_body(raw, parse_chat_request(raw), route)
    assert labels == () and body == raw.replace(b'"gpt-5"', b'"up"')


def test_a_preset_with_nothing_to_fix_keeps_the_bytes_too():
    raw = b'{"model": "gpt-4o",  "max_tokens": 10}'
    route = routes_for(CHANNEL + "    preset: openai\n", "gpt-4o").routes[0]
    assert attempt_body(raw, parse_chat_request(raw), route) == (raw, ())


def test_a_preset_rewrites_a_fresh_copy_each_time():
    raw = json.dumps({**OPENCODE_BODY, "model": "gpt-5"}).encode()
    request = parse_chat_request(raw)
    route = routes_for(CHANNEL + "    preset: openai\n", "gpt-5").routes[0]
    first, labels = attempt_body(raw, request, route)
    second, _ = attempt_body(raw, request, route)
    assert first == second and "max_tokens→max_completion_tokens" in labels
    assert json.loads(first)["max_completion_tokens"] == 32000 and "max_tokens" not in json.loads(first)
    assert json.loads(raw)["max_tokens"] == 32000  # the client's body is untouched


def test_image_requests_skip_channels_that_take_none():
    config = CHANNEL + "    preset: deepseek\n  - name: b\n    base_url: https://y/v1\n    api_keys: [k]\n"
    plan = routes_for(config, "m")
    image = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]}).encode()
    left, refused = image_refusals(plan, parse_chat_request(image))
    assert [r.channel.name for r in left.routes] == ["b"]
    assert refused == [("a", "m", "takes no images (preset deepseek)")]
    assert ("a", "takes no images (preset deepseek)") in left.skipped
    text = b'{"model": "m", "messages": [{"role": "user", "content": "an image of a cat"}]}'
    assert image_refusals(plan, parse_chat_request(text)) == (plan, [])


# --- reasoning cache --------------------------------------------------------------------


def test_cache_keys_by_tool_call_id_then_text_and_per_channel():
    cache = ReasoningCache()
    cache.remember("ds", ["call:call_1"], "thought one")
    capture_completion(cache, "ds", json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "  The answer.\n", "reasoning_content": "thought two"}}]}).encode())
    assert cache.recall("ds", {"role": "assistant", "tool_calls": [{"id": "call_1"}]}) == "thought one"
    assert cache.recall("ds", {"role": "assistant", "content": "The answer."}) == "thought two"
    assert cache.recall("other", {"role": "assistant", "tool_calls": [{"id": "call_1"}]}) is None
    assert message_keys({"content": [{"type": "text", "text": "x"}], "tool_calls": [{"id": "c"}]})[0] == "call:c"


def test_cache_is_bounded_by_entries_bytes_and_age():
    cache = ReasoningCache(max_entries=3, max_bytes=1000, ttl=10)
    for i in range(5):
        cache.remember("c", [f"call:{i}"], "x" * 100, now=0)
    assert len(cache) == 3 and cache.bytes == 300
    assert cache.recall("c", {"tool_calls": [{"id": "0"}]}, now=1) is None  # evicted, oldest first
    assert cache.recall("c", {"tool_calls": [{"id": "4"}]}, now=1) == "x" * 100
    cache.remember("c", ["call:big"], "y" * 900, now=0)
    assert cache.bytes <= 1000
    assert cache.recall("c", {"tool_calls": [{"id": "big"}]}, now=11) is None  # expired
    cache.remember("c", ["call:new"], "z", now=20)  # expired ones go on the next insert
    assert len(cache) == 1 and cache.bytes == 1


def stream_events(reasoning: list[str], call_id: str | None, text: str = "") -> bytes:
    out = b""
    for piece in reasoning:
        out += b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"reasoning_content": piece}}]}).encode() + b"\n\n"
    if call_id:
        out += b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": call_id, "function": {"name": "read", "arguments": ""}}]}}]}).encode() + b"\n\n"
    if text:
        out += b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]}).encode() + b"\n\n"
    return out + b": keep-alive\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_stream_observer_passes_every_chunk_unchanged_and_remembers(size):
    cache = ReasoningCache()
    observer = ReasoningObserver(cache, "ds")
    stream = stream_events(["Let me ", "read it."], "call_7", "done")
    chunks = [stream[i:i + size] for i in range(0, len(stream), size)]
    assert [observer.feed(c) for c in chunks] == chunks  # nothing held back, nothing changed
    assert observer.end() == b""
    assert cache.recall("ds", {"tool_calls": [{"id": "call_7"}]}) == "Let me read it."
    assert cache.recall("ds", {"content": "done"}) == "Let me read it."


def test_stream_without_reasoning_remembers_nothing():
    cache = ReasoningCache()
    observer = ReasoningObserver(cache, "ds")
    observer.feed(stream_events([], "call_1", "hi"))
    observer.end()
    assert len(cache) == 0


def test_a_lone_surrogate_stays_escaped_when_the_body_is_rewritten():
    raw = b'{"model": "gpt-5", "max_tokens": 5, "messages": [{"role": "user", "content": "\\ud800 x"}]}'
    route = routes_for(CHANNEL + "    preset: openai\n", "gpt-5").routes[0]
    body, labels = attempt_body(raw, parse_chat_request(raw), route)
    assert labels == ("max_tokens→max_completion_tokens",)
    assert b'"\\ud800 x"' in body and json.loads(body)["max_completion_tokens"] == 5


_scalars = st.none() | st.booleans() | st.integers(-10**5, 10**5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
                                  "content": st.text(max_size=8) | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)}), max_size=2)},
                                 optional={"tool_calls": st.lists(st.fixed_dictionaries({"id": st.text(min_size=1, max_size=4)}), max_size=2)})
_params = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(0, 100_000), "max_completion_tokens": st.integers(0, 100_000), "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1), "tool_choice": st.sampled_from(["auto", "none", "required"]), "stop": _values,
    "tools": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search"]), "function": st.fixed_dictionaries({"name": st.text(max_size=4)})}), max_size=3),
    "response_format": st.sampled_from([{"type": "json_schema", "json_schema": {}}, {"type": "text"}]),
    "messages": st.lists(_message, max_size=5),
})


@settings(max_examples=300, deadline=None)
@given(params=_params, extra=st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("model", "stream")), _values, max_size=3),
       preset=st.sampled_from(["openai", "deepseek", "glm", "minimax", "kimi"]),
       model=st.sampled_from(["gpt-5", "deepseek-chat", "glm-4.6", "MiniMax-M2", "kimi-k2.5", "other"]),
       indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_the_spliced_body_is_the_fixed_body(params, extra, preset, model, indent, ascii_only):
    """Whatever is copied from the client's text or serialized again, the upstream's JSON is
    exactly the client's body with the fixes applied and the model mapped."""
    body = {**extra, "model": "client", **params}
    raw = json.dumps(body, indent=indent, ensure_ascii=ascii_only).encode()
    route = routes_for(CHANNEL + f"    preset: {preset}\n    model_mapping: {{client: {model}}}\n", "client").routes[0]
    sent, labels = attempt_body(raw, parse_chat_request(raw), route)
    expected = json.loads(raw)
    spec = fixes_for(route.channel, model)
    assert list(labels) == (apply_fixes(expected, spec) if spec else [])
    expected["model"] = model
    assert json.loads(sent) == expected


_anything = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(["role", "content", "tool_calls", "id", "type", "text", "function", "parameters", "reasoning_content", "x"]),
    inner, max_size=4), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["messages", "tools", "tool_choice", "response_format", "max_tokens",
                                             "temperature", "top_p", "stream_options", "stop"]), _anything, max_size=6),
       preset=st.sampled_from(["openai", "deepseek", "glm", "minimax", "kimi"]))
def test_no_client_body_makes_a_fix_fail(body, preset):
    """Fixes see whatever a client sends (a message that is a number, tool_calls that is a
    string...): they fix what they understand and leave the rest to the upstream."""
    cache = ReasoningCache()
    cache.remember("c", ["call:x"], "r")
    model = {"openai": "gpt-5", "deepseek": "deepseek-chat", "glm": "glm-4.6", "minimax": "m", "kimi": "kimi-k2.5"}[preset]
    raw = json.dumps({"model": "client", **body}).encode()
    route = routes_for(CHANNEL + f"    preset: {preset}\n    model_mapping: {{client: {model}}}\n", "client").routes[0]
    sent, labels = attempt_body(raw, parse_chat_request(raw), route, cache)
    expected = json.loads(raw)
    spec = fixes_for(route.channel, model)
    assert list(labels) == (apply_fixes(expected, spec, lambda m: cache.recall("c", m)) if spec else [])
    expected["model"] = model
    assert json.loads(sent) == expected
    observer = ReasoningObserver(cache, "c")
    assert observer.feed(b"data: " + json.dumps({"choices": body.get("messages")}).encode() + b"\n\n") is not None
    observer.end()
    capture_completion(cache, "c", json.dumps({"choices": [{"message": body.get("messages")}, body.get("tools")]}).encode())


def test_labels_stay_short_whatever_the_client_sent():
    data = {"tool_choice": "x" * 5000}
    [label] = fixes.map_values(data, (("tool_choice", (("*", "auto"),)),))
    assert label == "tool_choice " + "x" * 23 + "…→auto"
