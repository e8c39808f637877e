"""Faults survived, end to end: fake upstreams that misbehave on demand, and for each what the
client receives, which channel and key served it, and what the flow shows."""

import json
import socket
import time

import pytest

from chatclient import (
    ask, chat_flows, error_of, events, health, raw_request, read_until, streamed_text, wait_until,
)
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk, chunk_events, http_head, json_answer, openai_like
from harness import free_port

K1, K2, K3 = UPSTREAM_KEYS
SSE_HEAD = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
PARTIAL = chunk_events("m", ["partial", " answer"], usage=False)[:3]  # no finish, no [DONE]
HTML = b"<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


def error_json(status: int, message: str, headers=None):
    return lambda r: json_answer(status, {"error": {"message": message, "type": "x", "param": None, "code": None}}, headers)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def assert_no_secrets(gw) -> None:
    dump = json.dumps([str(f.get_state()) for f in gw.flows]) + json.dumps([str(s) for _, s in gw.collector.updates])
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret not in dump


def key_of(received) -> str:
    return received.headers["authorization"].removeprefix("Bearer ")


# --- failover before any byte reached the client ----------------------------------------------

FAULTS = {
    # name: (behaviour of the first channel, its extra config, outcome shown for it)
    "refused": (None, "", "cannot connect: Connection refused"),
    "reset before headers": (lambda r: [("reset",)], "", "connection closed before response headers"),
    "headers never sent": (lambda r: [("hang",)], "timeouts: {response_headers: 0.4, total: 0.4}", "no response headers within 0.4s"),
    "500": (error_json(500, "internal boom"), "", "500 internal boom"),
    "503": (error_json(503, "overloaded"), "", "503 overloaded"),
    "html error page": (lambda r: [("send", http_head(502, {"content-type": "text/html", "content-length": str(len(HTML))}) + HTML)],
                        "", "502"),
    "not HTTP": (lambda r: [("send", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), ("close",)], "",
                 "invalid HTTP response: Bad status line"),
    "200 with error body": (error_json(200, "model overloaded, try later"), "",
                            "200 with an error body: model overloaded, try later"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_failover_before_the_first_byte(gateway, upstreams, fault):
    behaviour, extra, outcome = FAULTS[fault]
    first_url = dead_url() if behaviour is None else upstreams(behaviour).url + "/v1"
    second = upstreams()
    gw = gateway(config(channel("first", first_url, keys=(K1,), extra=extra),
                        channel("second", second.url + "/v1", keys=(K2,))))

    r = ask(gw)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "hello from upstream"
    s = ask(gw, stream=True)
    assert s.status_code == 200
    assert streamed_text(events(s.text)) == "hello from upstream" and events(s.text)[-1] == "[DONE]"

    for response in (r, s):
        assert response.headers["x-ccx-channel"] == "second"
        assert response.headers["x-ccx-attempts"] == "2"
    assert [key_of(x) for x in second.received] == [K2, K2]
    for flow in chat_flows(gw, 2):
        assert flow.comment.startswith("✓ second ⟵ first ") and "key second#1" in flow.comment
        assert f"first (first#1): {outcome}" in flow.comment
        assert flow.marked == ":yellow_circle:"
        meta = flow.metadata["ccx"]
        assert meta["channel"] == "second" and meta["key"] == "second#1"
        assert [(a["channel"], a["key"]) for a in meta["attempts"]] == [("first", "first#1"), ("second", "second#1")]
        assert meta["attempts"][0]["outcome"].startswith(outcome) and meta["attempts"][1]["outcome"] == "200"
    assert_no_secrets(gw)


def test_connect_timeout_moves_on(gateway, upstreams):
    # A listener that never accepts, with its backlog full: the next SYN goes unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.1)
        second = upstreams()
        gw = gateway(config(channel("first", f"http://127.0.0.1:{port}/v1", extra="timeouts: {connect: 0.3}"),
                            channel("second", second.url + "/v1")))
        started = time.monotonic()
        r = ask(gw)
        assert r.status_code == 200 and r.headers["x-ccx-channel"] == "second"
        assert time.monotonic() - started < 3
        [flow] = chat_flows(gw, 1)
        assert "first (first#1): connect timeout after 0.3s" in flow.comment
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_total_timeout_bounds_a_non_streaming_exchange(gateway, upstreams):
    # Headers arrive, the body never completes.
    slow = upstreams(lambda r: [("send", http_head(200, {"content-type": "application/json", "content-length": "100"}) + b'{"id"'), ("hang",)])
    second = upstreams()
    gw = gateway(config(channel("slow", slow.url + "/v1", extra="timeouts: {total: 0.5}"),
                        channel("second", second.url + "/v1")))
    started = time.monotonic()
    r = ask(gw)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "second"
    assert time.monotonic() - started < 3
    [flow] = chat_flows(gw, 1)
    assert "slow (slow#1): 200, then response body not complete within 0.5s" in flow.comment
    assert wait_until(lambda: slow.aborted == 1, 2)  # the abandoned exchange was closed


def test_total_timeout_also_covers_the_wait_for_headers(gateway, upstreams):
    slow = upstreams(lambda r: [("hang",)])
    gw = gateway(config(channel("slow", slow.url + "/v1", extra="timeouts: {total: 0.4}")))
    r = ask(gw)
    assert r.status_code == 504
    assert "slow (slow#1): no response headers within 0.4s (timeouts.total)" in error_of(r)["message"]
    assert r.headers["x-ccx-gateway"] == "local"


# --- key pools --------------------------------------------------------------------------------


def by_key(answers: dict):
    """A behaviour answering per upstream key; keys not listed get a normal answer."""
    return lambda r: answers.get(key_of(r), openai_like)(r)


def cooling(gw, channel_name: str) -> list:
    return [k["cooling_for_s"] for k in health(gw)[channel_name]["keys"]]


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "30"}, 30),
    ({"retry-after-ms": "12000"}, 12),
    ({}, 7),  # the channel's cooldown
])
def test_429_cools_the_key_down_and_the_next_key_serves(gateway, upstreams, headers, expected):
    up = upstreams(by_key({K1: error_json(429, "Rate limit reached", headers)}))
    gw = gateway(config(channel("pool", up.url + "/v1", keys=(K1, K2), extra="cooldown: 7")))

    r = ask(gw)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "pool"
    [flow] = chat_flows(gw, 1)
    assert flow.metadata["ccx"]["key"] == "pool#2"
    assert flow.comment.startswith("✓ pool ⟵ pool 429") and "key pool#2" in flow.comment and "pool (pool#1): 429 rate limited" in flow.comment
    assert expected - 1 < cooling(gw, "pool")[0] <= expected

    for _ in range(3):  # the cooling key is left alone
        assert ask(gw).status_code == 200
    assert [key_of(x) for x in up.received] == [K1, K2, K2, K2, K2]
    assert_no_secrets(gw)


def test_429_default_cooldown_is_60s_and_short_retry_after_expires(gateway, upstreams):
    answers = {K1: error_json(429, "slow down")}
    up = upstreams(by_key(answers))
    gw = gateway(config(channel("pool", up.url + "/v1", keys=(K1, K2))))
    assert ask(gw).status_code == 200
    assert 59 < cooling(gw, "pool")[0] <= 60

    answers[K2] = error_json(429, "slow down", {"retry-after-ms": "300"})
    gw2 = gateway(config(channel("pool", up.url + "/v1", keys=(K2, K3))))
    assert ask(gw2).status_code == 200  # K2 cools 0.3 s, K3 serves
    del answers[K2]
    time.sleep(0.35)
    assert [ask(gw2).status_code for _ in range(2)] == [200, 200]
    assert [key_of(x) for x in up.received[-4:]] == [K2, K3, K2, K3]  # K2 back in rotation


@pytest.mark.parametrize("status, body, reason, preset", [
    (401, {"error": {"message": "Incorrect API key provided: sk-up-***"}}, "401 key rejected", ""),
    (403, {"error": {"message": "forbidden"}}, "403 key rejected", ""),
    (402, {"error": {"message": "Insufficient Balance"}}, "402 payment required", ""),
    (429, {"error": {"message": "You exceeded your current quota", "code": "insufficient_quota"}},
     "429 quota or balance used up: You exceeded your current quota (code insufficient_quota)", ""),
    (429, {"error": {"code": "1113", "message": "余额不足或无可用资源包"}},
     "429 quota or balance used up: 余额不足或无可用资源包 (code 1113)", "glm"),
    (200, {"base_resp": {"status_code": 1008, "status_msg": "insufficient balance"}},
     "200 quota or balance used up: insufficient balance (code 1008)", ""),
])
def test_rejected_or_exhausted_key_is_disabled_until_reload(gateway, upstreams, status, body, reason, preset):
    up = upstreams(by_key({K1: lambda r: json_answer(status, body)}))
    gw = gateway(config(channel("pool", up.url + "/v1", keys=(K1, K2), extra=f"preset: {preset}" if preset else "")))
    for stream in (False, True, False):
        r = ask(gw, stream=stream)
        assert r.status_code == 200 and r.headers["x-ccx-channel"] == "pool"
    # (A preset channel also fetches the upstream's /models list.)
    assert [key_of(x) for x in up.received if x.method == "POST"] == [K1, K2, K2, K2]
    [first, *_] = chat_flows(gw, 3)
    assert first.metadata["ccx"]["key"] == "pool#2"
    assert f"pool (pool#1): {reason}" in first.comment
    keys = health(gw)["pool"]["keys"]
    assert keys[0] == {"key": "pool#1", "disabled": reason, "cooling_for_s": 0, "sessions": 0}
    assert keys[1]["disabled"] is None
    assert_no_secrets(gw)


def test_every_key_cooling_gets_503_with_retry_after_without_calling_upstreams(gateway, upstreams):
    a = upstreams(error_json(429, "a: slow down", {"retry-after": "40"}))
    b = upstreams(error_json(429, "b: slow down", {"retry-after": "20"}))
    gw = gateway(config(channel("a", a.url + "/v1", keys=(K1, K2)), channel("b", b.url + "/v1", keys=(K3,))))

    r = ask(gw)
    # Every key tried: the client gets the last upstream answer as it was.
    assert r.status_code == 429 and error_of(r)["message"] == "b: slow down"
    assert r.headers["retry-after"] == "20" and "x-ccx-gateway" not in r.headers
    assert (len(a.received), len(b.received)) == (2, 1)

    for stream in (False, True):
        started = time.monotonic()
        r = ask(gw, stream=stream)
        assert time.monotonic() - started < 1
        assert r.status_code == 503 and r.headers["x-ccx-gateway"] == "local"
        assert 19 <= int(r.headers["retry-after"]) <= 20  # the soonest recovery
        err = error_of(r)
        assert err["code"] == "channels_unavailable"
        assert "did not call any upstream" in err["message"]
        assert "key a#1 cooling down for 40s; key a#2 cooling down for 40s" in err["message"]
        assert "key b#1 cooling down for 20s" in err["message"]
    assert (len(a.received), len(b.received)) == (2, 1)
    meta = chat_flows(gw, 3)[-1].metadata["ccx"]
    assert meta["channel"] is None and meta["status"] == 503
    assert [a["outcome"][:30] for a in meta["attempts"]] == ["skipped: key a#1 cooling down ", "skipped: key b#1 cooling down "]


def test_every_key_disabled_gets_503_without_retry_after(gateway, upstreams):
    up = upstreams(error_json(401, "bad key"))
    gw = gateway(config(channel("only", up.url + "/v1", keys=(K1,))))
    assert ask(gw).status_code == 401  # the upstream's answer, once
    r = ask(gw)
    assert r.status_code == 503 and "retry-after" not in r.headers
    assert "key only#1 disabled (401 key rejected)" in error_of(r)["message"]
    assert len(up.received) == 1


# --- circuit breaker ----------------------------------------------------------------------------


def test_circuit_opens_skips_probes_and_closes(gateway, upstreams):
    broken = {"on": True}
    first = upstreams(lambda r: error_json(500, "down")(r) if broken["on"] else openai_like(r))
    second = upstreams()
    gw = gateway(config(
        channel("first", first.url + "/v1"), channel("second", second.url + "/v1"),
        top="circuit_breaker: {consecutive_failures: 3, backoff: 0.5, max_backoff: 5}\n",
    ))
    for _ in range(3):
        assert ask(gw).headers["x-ccx-channel"] == "second"
    assert len(first.received) == 3 and health(gw)["first"]["circuit"] == "open"

    r = ask(gw)  # skipped while open
    assert r.headers["x-ccx-channel"] == "second" and r.headers["x-ccx-attempts"] == "1"
    assert len(first.received) == 3
    assert "first (-): skipped: circuit open after repeated failures" in chat_flows(gw, 4)[-1].comment

    time.sleep(0.55)
    assert ask(gw).headers["x-ccx-channel"] == "second"  # the probe failed: back-off doubles
    assert len(first.received) == 4
    time.sleep(0.3)
    assert ask(gw).headers["x-ccx-channel"] == "second"
    assert len(first.received) == 4  # 1 s this time

    broken["on"] = False
    time.sleep(0.8)
    r = ask(gw, stream=True)  # the probe succeeds and closes the circuit
    assert r.headers["x-ccx-channel"] == "first"
    assert health(gw)["first"]["circuit"] == "closed"
    assert [ask(gw).headers["x-ccx-channel"] for _ in range(2)] == ["first", "first"]


def test_every_circuit_open_gets_503_at_once(gateway, upstreams):
    a = upstreams(error_json(503, "a down"))
    b = upstreams(error_json(500, "b down"))
    gw = gateway(config(
        channel("a", a.url + "/v1"), channel("b", b.url + "/v1"),
        top="circuit_breaker: {consecutive_failures: 2, backoff: 30}\n",
    ))
    assert [ask(gw).status_code for _ in range(2)] == [500, 500]
    r = ask(gw)
    assert r.status_code == 503 and r.headers["x-ccx-gateway"] == "local"
    assert 29 <= int(r.headers["retry-after"]) <= 30
    assert "a (-): skipped: circuit open" in error_of(r)["message"]
    assert (len(a.received), len(b.received)) == (2, 2)


# --- after the first byte: no failover, a clear end ----------------------------------------------

MID_STREAM = {
    "reset": ([("reset",)], "", "upstream connection broke mid-stream"),
    # aiohttp either raises at once or records the broken body for the gateway's check to
    # find (upstream.read_chunk): either wording says the upstream broke off.
    "close without the last chunk": ([("close",)], "", "upstream connection broke mid-stream|upstream broke off the stream"),
    "idle": ([("hang",)], "timeouts: {idle: 0.4}", "upstream sent nothing for 0.4s"),
}


@pytest.mark.parametrize("fault", list(MID_STREAM))
def test_mid_stream_failure_ends_with_an_error_event(gateway, upstreams, fault):
    steps, extra, failure = MID_STREAM[fault]
    # The last event is cut in half, as a real reset would leave it.
    cut = PARTIAL[-1][:20]
    first = upstreams(lambda r: [("send", SSE_HEAD)] + [("send", chunk(e)) for e in PARTIAL[:-1]]
                      + [("send", chunk(cut)), ("sleep", 0.05)] + steps)
    second = upstreams()
    gw = gateway(config(channel("first", first.url + "/v1", extra=extra), channel("second", second.url + "/v1")))

    started = time.monotonic()
    r = ask(gw, stream=True)  # returns: the stream ended, it did not hang
    assert time.monotonic() - started < 5
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "first"
    assert r.text.startswith((PARTIAL[0] + PARTIAL[1]).decode() + cut.decode() + "\n\n")
    payloads = events(r.text.replace(cut.decode() + "\n\n", "", 1))
    assert streamed_text(payloads) == "partial"
    final = payloads[-1]
    assert final["error"]["code"] == "stream_interrupted"
    assert any(f in final["error"]["message"] for f in failure.split("|")) and "incomplete" in final["error"]["message"]
    assert "[DONE]" not in r.text and r.text.endswith("\n\n")
    assert second.received == []  # bytes had reached the client: no failover

    [flow] = chat_flows(gw, 1)
    said = next(f for f in failure.split("|") if f in final["error"]["message"])
    assert flow.metadata["ccx"]["stream_failure"].startswith(said)
    assert f"stream ended early: {said}" in flow.comment
    assert flow.marked == ":red_circle:"
    assert b"stream_interrupted" in flow.response.content


def test_mid_stream_failure_through_the_openai_sdk_is_an_error_not_a_quiet_end(gateway, upstreams):
    import openai

    first = upstreams(lambda r: [("send", SSE_HEAD)] + [("send", chunk(e)) for e in PARTIAL] + [("reset",)])
    gw = gateway(config(channel("first", first.url + "/v1")))
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=PROXY_KEY, max_retries=0)
    stream = sdk.chat.completions.create(model="m", messages=[], stream=True)
    with pytest.raises(openai.APIError, match="stream was interrupted"):
        for _ in stream:
            pass


def test_client_leaving_while_waiting_for_headers_cancels_the_upstream(gateway, upstreams):
    up = upstreams(lambda r: [("hang",)])
    gw = gateway(config(channel("main", up.url + "/v1")))
    for stream in (False, True):
        sock = raw_request(gw, {"model": "m", "stream": stream, "messages": []})
        up.wait_for(1 + stream)
        assert len(up.received) == 1 + stream
        sock.close()
        started = time.monotonic()
        assert wait_until(lambda: up.aborted == 1 + stream, 3)
        assert time.monotonic() - started < 1.5  # the gateway polls every 0.25 s
    flows = chat_flows(gw, 2)
    assert all(f.comment.startswith("✂ aborted by client") and f.marked == ":large_blue_circle:" for f in flows)
    assert all("the client left before any answer" in f.comment for f in flows)


def test_client_leaving_mid_stream_cancels_the_upstream(gateway, upstreams):
    up = upstreams(lambda r: [("send", SSE_HEAD), ("send", chunk(PARTIAL[0])), ("hang",)]
                   if r.json["messages"] == [] else openai_like(r))
    gw = gateway(config(channel("main", up.url + "/v1")))
    sock = raw_request(gw, {"model": "m", "stream": True, "messages": []})
    assert b'"role": "assistant"' in read_until(sock, b"\n\n\r\n")
    sock.close()
    started = time.monotonic()
    assert wait_until(lambda: up.aborted == 1, 3)
    assert time.monotonic() - started < 1.5
    [flow] = chat_flows(gw, 1)
    assert flow.metadata["ccx"]["stream_failure"] == "client disconnected mid-stream"
    # Its own marker and words, said once; the part streamed before the client left is kept.
    assert flow.comment.startswith("✂ aborted by client main | m→m | 200 stream (partial) | ttft ")
    assert flow.comment.count("client") == 1 and flow.marked == ":large_blue_circle:"
    assert b'"role": "assistant"' in flow.response.raw_content
    # The channel did nothing wrong.
    assert health(gw)["main"]["circuit"] == "closed"
    assert ask(gw, stream=True, timeout=5).headers["x-ccx-channel"] == "main"


def test_mid_stream_failures_count_against_the_channel(gateway, upstreams):
    first = upstreams(lambda r: [("send", SSE_HEAD), ("send", chunk(PARTIAL[0])), ("reset",)])
    second = upstreams()
    gw = gateway(config(channel("first", first.url + "/v1"), channel("second", second.url + "/v1"),
                        top="circuit_breaker: {backoff: 30}\n"))
    # Each stream is a success (headers) then a failure (the reset): after three, 3 of 6
    # results failed, which reaches the failure ratio of 50% over at least 5 samples.
    for _ in range(3):
        r = ask(gw, stream=True)
        assert r.headers["x-ccx-channel"] == "first" and "stream_interrupted" in r.text
    chat_flows(gw, 3)
    assert health(gw)["first"]["circuit"] == "open"
    r = ask(gw, stream=True)
    assert r.headers["x-ccx-channel"] == "second" and events(r.text)[-1] == "[DONE]"
    assert len(first.received) == 3


def test_close_delimited_stream_cut_before_done_gets_an_error_event(gateway, upstreams):
    """No chunking, no length: the end of the connection is the end of the body, so a cut
    stream is told from a complete one by its missing [DONE]."""
    head = http_head(200, {"content-type": "text/event-stream", "connection": "close"})
    complete = chunk_events("m", ["whole"], usage=False)
    cut = upstreams(lambda r: [("send", head), ("send", PARTIAL[0] + PARTIAL[1]), ("reset",)])
    whole = upstreams(lambda r: [("send", head)] + [("send", e) for e in complete] + [("close",)])
    gw = gateway(config(channel("cut", cut.url + "/v1", extra='supported_models: ["cut"]'),
                        channel("whole", whole.url + "/v1", extra='supported_models: ["whole"]')))

    r = ask(gw, stream=True, model="whole")
    assert r.text == b"".join(complete).decode()
    r = ask(gw, stream=True, model="cut")
    payloads = events(r.text)
    assert streamed_text(payloads) == "partial"
    assert payloads[-1]["error"]["code"] == "stream_interrupted"
    assert "closed the connection before the end of the stream" in payloads[-1]["error"]["message"]
