"""Request body parsing and the in-place model rewrite; SSE helpers (pure)."""

import json

import pytest

from ccx_addon.body import BodyError, parse_chat_request, replace_model, with_stream_usage
from ccx_addon.echo import echo_reply
from ccx_addon.sse import StreamCapture, completion_to_events, find_usage


def rewrite(raw: bytes, new: str) -> bytes:
    return replace_model(raw, parse_chat_request(raw), new)


def test_only_the_top_level_model_changes():
    raw = (b'{"model":"gpt-5","tools":[{"function":{"parameters":{"properties":{"model":{"type":"string"}}}}}],'
           b' "messages":[{"role":"user","content":"use \\"model\\": \\"x\\""}], "metadata": {"model": "gpt-5"}}')
    out = rewrite(raw, "deepseek-chat")
    assert out == raw.replace(b'{"model":"gpt-5"', b'{"model":"deepseek-chat"', 1)
    assert json.loads(out)["metadata"]["model"] == "gpt-5"


def test_model_key_after_nested_model_keys_and_whitespace():
    raw = b'{\n  "messages": [{"model": "inner"}],\n  "model" :  "gpt-5" ,\n  "stream": true\n}'
    out = rewrite(raw, "up")
    assert json.loads(out) == {"messages": [{"model": "inner"}], "model": "up", "stream": True}
    assert out == raw.replace(b'"gpt-5"', b'"up"')


def test_escaped_and_unicode_model_names():
    raw = '{"model": "g\\u00e9pt", "messages": []}'.encode()
    out = rewrite(raw, "modèle/\"q\"")
    assert json.loads(out)["model"] == 'modèle/"q"'
    assert out.endswith(b', "messages": []}')


def test_duplicate_top_level_model_keys_are_refused():
    # Upstreams differ on which one counts; the gateway routed on the last and sent both.
    for raw in (b'{"model": "a", "messages": [], "model": "b"}', b'{"model": "a", "mod\\u0065l": "b"}',
                b'{"model": 1, "model": "b"}'):
        with pytest.raises(BodyError) as refused:
            parse_chat_request(raw)
        assert refused.value.code == "duplicate_parameter" and refused.value.param == "model"
    # Nested "model" keys, and an escaped letter elsewhere, are fine.
    assert parse_chat_request(b'{"model": "a", "m": {"model": 1}, "t": "\\u0041"}').model == "a"


def test_huge_integers_and_lone_surrogates():
    with pytest.raises(BodyError) as refused:
        parse_chat_request(b'{"model": "a", "n": ' + b"1" * 4301 + b"}")
    assert refused.value.code == "invalid_json" and "4300" in str(refused.value)
    # A lone surrogate survives re-serialisation as the escape the client sent.
    raw = b'{"model": "a", "stream": true, "messages": [{"content": "\\ud800"}]}'
    out = with_stream_usage(raw, parse_chat_request(raw))
    assert json.loads(out)["messages"][0]["content"] == "\ud800" and b"\\ud800" in out


def test_unchanged_model_returns_the_same_bytes():
    raw = b'{"model": "a"}'
    assert rewrite(raw, "a") is raw


def test_utf16_body_falls_back_to_reserialization():
    raw = json.dumps({"model": "a", "messages": []}).encode("utf-16")
    assert json.loads(rewrite(raw, "b")) == {"model": "b", "messages": []}


@pytest.mark.parametrize("raw, code", [
    (b"", "invalid_json"), (b"  ", "invalid_json"), (b"{", "invalid_json"), (b"\xff\xfe\x00", "invalid_json"),
    (b"null", "invalid_request_body"), (b'"s"', "invalid_request_body"),
    (b"{}", "missing_parameter"), (b'{"model": ""}', "invalid_type"), (b'{"model": null}', "invalid_type"),
    (b'{"model": "m", "stream": 1}', "invalid_type"), (b"[" * 100000, "invalid_json"),
])
def test_bad_bodies(raw, code):
    with pytest.raises(BodyError) as raised:
        parse_chat_request(raw)
    assert raised.value.code == code


def test_stream_usage_is_added_only_to_streams():
    raw = b'{"model": "m", "stream": true, "stream_options": {"x": 1}}'
    out = json.loads(with_stream_usage(raw, parse_chat_request(raw)))
    assert out["stream_options"] == {"x": 1, "include_usage": True}
    plain = b'{"model": "m"}'
    assert with_stream_usage(plain, parse_chat_request(plain)) is plain


def parse_events(data: bytes) -> list:
    events = [e for e in data.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def test_completion_to_events_keeps_text_tools_and_usage():
    completion = {
        "id": "c1", "created": 5, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "hi",
            "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "read", "arguments": "{}"}}],
        }}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    events = parse_events(completion_to_events(completion))
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == "c1" for e in events)
    delta = events[0]["choices"][0]["delta"]
    assert delta["content"] == "hi" and delta["tool_calls"][0]["index"] == 0
    assert delta["tool_calls"][0]["function"]["name"] == "read"
    assert events[1]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[2]["usage"]["total_tokens"] == 7


def test_find_usage_in_json_and_streams():
    assert find_usage(b'{"usage": {"prompt_tokens": 1}}') == {"prompt_tokens": 1}
    stream = b'data: {"choices": []}\n\ndata: {"choices": [], "usage": {"completion_tokens": 9}}\n\ndata: [DONE]\n\n'
    assert find_usage(stream) == {"completion_tokens": 9}
    assert find_usage(b"data: [DONE]\n\n") is None
    assert find_usage(b"not json") is None


def test_stream_capture_passes_everything_and_keeps_a_bounded_copy():
    capture = StreamCapture(limit=5)
    assert capture(b"abc") == b"abc" and capture(b"defg") == b"defg" and capture(b"") == b""
    assert bytes(capture.kept) == b"abcde" and capture.total == 7 and capture.truncated


def test_echo_reply_streams_and_plain():
    request = parse_chat_request(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "ping me"}]}],
    }).encode())
    kind, body = echo_reply(request, "m")
    assert kind == "application/json"
    assert json.loads(body)["choices"][0]["message"]["content"].endswith("ping me")
    stream_request = parse_chat_request(b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "a b"}]}')
    kind, body = echo_reply(stream_request, "m")
    assert kind == "text/event-stream"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in parse_events(body) if e["choices"])
    assert text.endswith("a b")
