"""The chat content view's rendering (pure functions) and the flow comment's verdict."""

import json

from ccx_addon.chatrender import assemble, render_answer, render_chat_body, render_request
from ccx_addon.flowsummary import short_outcome


def ev(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_request_is_the_conversation_turn_by_turn_then_the_tools():
    text = render_request({
        "model": "gpt-5", "stream": True, "temperature": 0.2,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "what is in a.py?"}, {"type": "image_url", "image_url": {}}]},
            {"role": "assistant", "content": None, "reasoning_content": "look first",
             "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a.py\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "print(1)"},
        ],
        "tools": [{"type": "function", "function": {"name": "read", "description": "Read a file.\nMore.",
                                                    "parameters": {"required": ["path"], "properties": {
                                                        "path": {"type": "string"}, "limit": {"type": "integer"}}}}}],
    })
    assert text.split("\n") == [
        'model: "gpt-5"  stream: true  temperature: 0.2',
        "── system ──", "Be brief.",
        "── user ──", "what is in a.py?", "[image_url]",
        "── assistant ──", "  (reasoning) look first", '  → tool call read (c1): {"path": "a.py"}',
        "── tool (c1) ──", "print(1)",
        "── tools (1) ──", "read(path: string*, limit: integer) — Read a file.",
    ]


def test_stream_is_assembled_across_events_and_choices():
    body = b"".join([
        ev({"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]}),
        b": keep-alive\n\n",
        ev({"choices": [{"index": 0, "delta": {"content": "lo", "reasoning": "r1"}}]}),
        ev({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": "{\"x\""}}]}}]}),
        ev({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}]}}]}),
        ev({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "function": {"arguments": ": 1}"}}]}}]}),
        ev({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ev({"error": {"message": "stream interrupted", "code": "stream_interrupted"}}),
        b"data: {\"choices\": [{\"delta\": {\"content\": \"cut",  # an incomplete last event
    ])
    answer = assemble(body)
    assert (answer.text, answer.reasoning, answer.finish_reason, answer.done) == ("Hello", "r1", "tool_calls", False)
    assert [(c.name, c.arguments) for c in sorted(answer.tool_calls.values(), key=lambda c: c.index)] == [
        ("f", "{}"), ("g", '{"x": 1}')]
    text = render_answer(answer, streamed=True)
    assert text.startswith("7 events, no [DONE] (cut short or still running), model m\n")
    assert '#1 g (b)\n  {"x": 1}' in text and "usage: n/a" in text
    assert text.endswith("── error ──\nstream interrupted [stream_interrupted]")


def test_only_chat_bodies_are_rendered():
    assert render_chat_body(b'{"model": "m"}', is_request=True) is None  # no messages
    assert render_chat_body(b"<html>", is_request=False) is None
    assert render_chat_body(b"not json", is_request=True) is None
    assert render_chat_body(b'{"object": "list", "data": []}', is_request=False) is None  # /v1/models
    error = render_chat_body(b'{"error": {"message": "bad key", "type": "x"}}', is_request=False)
    assert error.endswith("── error ──\nbad key")


def test_failed_attempts_are_named_in_a_word_or_two():
    assert short_outcome("503 overloaded") == "503"
    assert short_outcome("skipped: circuit open after repeated failures, next probe in 4s") == "circuit open"
    assert short_outcome("connect timeout after 0.3s") == "timeout"
    assert short_outcome("no response headers within 5s") == "timeout"
    assert short_outcome("cannot connect: Connection refused (127.0.0.1:9)") == "unreachable"


def test_mitmdump_shows_chat_flows_in_the_chat_view_at_flow_detail_3(mitmdump, upstreams):
    import httpx

    from conftest import PROXY_KEY, channel, config

    up = upstreams()
    gw = mitmdump(config(channel("main", up.url + "/v1")), "--set", "flow_detail=3")
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "say hello"}]}
    reply = httpx.post(gw.url + "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
    assert reply.status_code == 200
    gw.stop()
    log = gw.log()
    # The request turn by turn, the streamed answer assembled.
    assert "── user ──\n" in log and "say hello" in log
    assert "── text ──" in log and "hello from upstream" in log and "finish_reason: stop" in log
    assert PROXY_KEY not in log


# --- the comment's verdict (flowsummary), pure -----------------------------------------------


def _record(attempts, status=200, stream=False, **fields):
    from ccx_addon.config import Channel
    from ccx_addon.forwarding import Attempt, ForwardResult
    from ccx_addon.routing import Route
    from ccx_addon.state import FlowRecord

    route = Route(Channel("good", "http://127.0.0.1:1", ("k",)), "up-model", None)
    result = ForwardResult(status, "", [], route=route, key_label="good#1",
                           attempts=[Attempt(*a) for a in attempts])
    return FlowRecord(endpoint="chat", requested_model="gpt-5", stream=stream, result=result, **fields)


def test_comment_words_for_first_try_failover_abort_and_replay():
    from ccx_addon.flowsummary import Timing, comment_for, judge

    timing = Timing(0.1, 0.2, 1.5)
    first = _record([("good", "good#1", "up-model", "200", True)], stream=True)
    text = comment_for(judge(first, 200), "chat", timing, None, "abc", True)
    assert text == "✓ good | gpt-5→up-model | 200 stream | ttft 200ms | 1.50s | usage n/a | key good#1 | session abc"
    assert "attempt" not in text and "failover" not in text

    failover = _record([("flaky", "flaky#1", "m", "503 overloaded"), ("good", "good#1", "up-model", "200", True)])
    verdict = judge(failover, 200)
    assert (verdict.head, verdict.marker) == ("✓ good ⟵ flaky 503", ":yellow_circle:")
    assert comment_for(verdict, "chat", timing, {"prompt_tokens": 3, "completion_tokens": 4}) == (
        "✓ good ⟵ flaky 503 | gpt-5→up-model | 200 | ttfb 100ms | 1.50s | tokens in 3 out 4 | "
        "failover after flaky (flaky#1): 503 overloaded | key good#1")

    aborted = _record([("good", "good#1", "up-model", "200", True)], stream=True,
                      stream_failure="client disconnected mid-stream")
    verdict = judge(aborted, 200, "")
    assert (verdict.head, verdict.marker, verdict.failed) == ("✂ aborted by client good", ":large_blue_circle:", False)
    assert comment_for(verdict, "chat", timing, None, stream=True).startswith(
        "✂ aborted by client good | gpt-5→up-model | 200 stream (partial) | ttft 200ms | 1.50s | key good#1")

    replay = comment_for(judge(first, 200), "chat", timing, None, stream=True, replay_of="0123456789abcdef")
    assert replay.startswith("↻✓ good | replay of 01234567 | gpt-5→up-model | 200 stream")

    # In flight (no timing yet): no premature "usage n/a".
    assert "usage" not in comment_for(judge(first, 200), "chat", None, None, stream=True)
