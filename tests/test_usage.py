"""Tokens on every stream: from the upstream's usage when it sends it; else by asking for
`stream_options.include_usage` (channel option `stream_usage`) and taking the extra chunk
out when the client did not ask for it; else the comment says `usage n/a`."""

import json

import httpx

from chatclient import chat_flows
from conftest import PROXY_KEY, channel, config
from fakeupstream import chunk_events, sse_answer

from ccx_addon.usagechunk import UsageChunkRemover, client_asked_for_usage, usage_only

AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


def usage_when_asked(received):
    """Like OpenAI: the usage-only chunk comes only with stream_options.include_usage."""
    asked = (received.json.get("stream_options") or {}).get("include_usage")
    return sse_answer(chunk_events(received.json["model"], ["a", "b"], usage=bool(asked)))


def stream(gw, **extra):
    body = {"model": "m", "stream": True, "messages": [], **extra}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)


def data_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


def test_usage_asked_for_on_the_clients_behalf_is_counted_but_not_sent(gateway, upstreams):
    up = upstreams(usage_when_asked)
    gw = gateway(config(channel("main", up.url + "/v1", extra="stream_usage: true")))
    reply = stream(gw)
    assert reply.status_code == 200
    assert up.received[0].json["stream_options"] == {"include_usage": True}
    events = data_events(reply.text)
    assert not any("usage" in e for e in events) and reply.text.endswith("data: [DONE]\n\n")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "ab"
    [flow] = chat_flows(gw, 1)
    assert "| tokens in 11 out 2 |" in flow.comment
    assert flow.metadata["ccx"]["usage"]["completion_tokens"] == 2

    # A client that asked gets the chunk.
    reply = stream(gw, stream_options={"include_usage": True})
    assert data_events(reply.text)[-1]["usage"]["completion_tokens"] == 2


def test_a_stream_without_usage_says_so(gateway, upstreams):
    up = upstreams(usage_when_asked)
    gw = gateway(config(channel("main", up.url + "/v1")))
    assert stream(gw).status_code == 200
    assert "stream_options" not in up.received[0].json
    [flow] = chat_flows(gw, 1)
    assert "| usage n/a |" in flow.comment


def test_the_usage_chunk_is_removed_across_transport_chunks_without_holding_others():
    events = chunk_events("m", ["x"], usage=True)
    stream = b"".join(events)
    seen = []
    remover = UsageChunkRemover(seen.append)
    out = b""
    for i in range(0, len(stream), 7):  # 7-byte transport chunks
        out += remover.feed(stream[i:i + 7])
    out += remover.end()
    assert out == b"".join(e for e in events if b'"usage"' not in e)
    assert seen == [{"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}]
    # A complete event goes on at once, in the same call.
    assert UsageChunkRemover(seen.append).feed(events[0] + events[1][:5]) == events[0]
    # Usage inside a chunk that has choices is not an extra chunk.
    assert usage_only(b'data: {"choices": [{"delta": {}}], "usage": {"prompt_tokens": 1}}\n\n') is None
    assert client_asked_for_usage(b'{"stream_options": {"include_usage": true}}')
    assert not client_asked_for_usage(b'{"stream_options": {"include_usage": false}}')
    assert not client_asked_for_usage(b'{"messages": []}')
