"""Issue 9, items 9 and 10 (upstream side): an upstream that breaks its HTTP framing fails
the attempt at once, with a message that says so, and an upstream content encoding is
decoded (gzip, deflate) or refused, never passed on under a header that no longer matches.
Against a real `mitmdump -s ccx_addon/addon.py` subprocess and raw fake upstreams."""

import gzip
import json
import zlib

import httpx
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk, chunk_events, completion, http_head, json_answer, sse_answer
from gateway_process import start_gateway

AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
# Far beyond what a test waits: an answer within the client's timeout proves the gateway
# did not sit out these limits.
SLOW_LIMITS = "timeouts: {total: 300, idle: 300, response_headers: 300}"


@pytest.fixture
def gateway(upstreams, write_config, tmp_path):
    started = []

    def start(*channels: str):
        gw = start_gateway(write_config(config(*channels)), tmp_path)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def post(gw, stream: bool, model: str = "m") -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, timeout=20,
                      json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})


def broken_chunking(received):
    """Headers and one good chunk, then a chunk size that is not hex, and the upstream closes."""
    content_type = "text/event-stream" if received.json.get("stream") else "application/json"
    return [("send", http_head(200, {"content-type": content_type, "transfer-encoding": "chunked"})),
            ("send", chunk(b"data: {\"choices\": []}\n\n" if "event" in content_type else b"{\"id\":")),
            ("sleep", 0.2), ("send", b"ZZZ\r\nnot a chunk\r\n"), ("close",)]


def test_broken_chunked_body_fails_a_non_streaming_attempt_at_once(gateway, upstreams):
    broken = upstreams(broken_chunking)
    answer = post(gateway(channel("broken", broken.url + "/v1", extra=SLOW_LIMITS)), stream=False)
    assert answer.status_code == 502
    message = answer.json()["error"]["message"]
    assert "broken (broken#1): 200, then upstream broke off the body: Invalid character in chunk size" in message


def test_broken_chunked_body_fails_over_to_the_next_channel(gateway, upstreams):
    broken, good = upstreams(broken_chunking), upstreams()
    gw = gateway(channel("broken", broken.url + "/v1", extra=SLOW_LIMITS),
                 channel("good", good.url + "/v1", keys=(UPSTREAM_KEYS[1],)))
    answer = post(gw, stream=False)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "hello from upstream"
    assert answer.headers["x-ccx-channel"] == "good"


def test_broken_chunked_stream_ends_with_an_error_event_that_says_why(gateway, upstreams):
    broken = upstreams(broken_chunking)
    answer = post(gateway(channel("broken", broken.url + "/v1", extra=SLOW_LIMITS)), stream=True)
    assert answer.status_code == 200
    events = [line for line in answer.text.split("\n") if line.startswith("data: ")]
    assert events[0] == 'data: {"choices": []}'
    error = json.loads(events[-1][6:])["error"]
    assert error["code"] == "stream_interrupted"
    assert "upstream broke off the stream: Invalid character in chunk size" in error["message"]
    assert "sent nothing" not in error["message"]


def gzip_stream(received):
    """An SSE stream gzip-compressed although the gateway asked for identity, flushed
    event by event as a compressing server streams."""
    model = received.json["model"]
    compressor = zlib.compressobj(wbits=31)
    steps = [("send", http_head(200, {"content-type": "text/event-stream", "content-encoding": "gzip",
                                      "transfer-encoding": "chunked"}))]
    for event in chunk_events(model, ["hello", " from", " gzip"]):
        steps += [("send", chunk(compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH))), ("sleep", 0.02)]
    return steps + [("send", chunk(compressor.flush())), ("send", b"0\r\n\r\n")]


def test_gzip_encoded_stream_reaches_the_client_decoded(gateway, upstreams):
    up = upstreams(gzip_stream)
    answer = post(gateway(channel("gz", up.url + "/v1")), stream=True)
    assert answer.status_code == 200 and "content-encoding" not in answer.headers
    pieces = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
              for line in answer.text.split("\n") if line.startswith("data: {") and '"choices": [{' in line]
    assert "".join(pieces) == "hello from gzip"
    assert answer.text.rstrip().endswith("data: [DONE]")
    assert up.received[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("encoding, encode", [
    ("gzip", gzip.compress),
    ("deflate", zlib.compress),
    ("deflate", lambda data: zlib.compress(data, wbits=-15)),  # raw deflate, as some servers send
])
def test_encoded_json_answer_reaches_the_client_decoded(gateway, upstreams, encoding, encode):
    up = upstreams(lambda r: json_answer(200, encode(json.dumps(completion("m")).encode()),
                                         headers={"content-encoding": encoding}))
    answer = post(gateway(channel("enc", up.url + "/v1")), stream=False)
    assert answer.status_code == 200 and "content-encoding" not in answer.headers
    assert answer.json()["choices"][0]["message"]["content"] == "hello from upstream"


@pytest.mark.parametrize("encoding, body, reason", [
    ("br", b"\x1b\x03\x00", "content-encoding 'br', which the gateway does not decode"),
    ("zstd", b"\x28\xb5\x2f\xfd", "content-encoding 'zstd', which the gateway does not decode"),
    ("gzip", b"\x1f\x8b not gzip at all", "upstream sent an invalid gzip body"),
    ("gzip", gzip.compress(b" " * (80 * 1024 * 1024)), "gzip body inflates beyond"),
])
def test_undecodable_answer_fails_the_attempt_and_fails_over(gateway, upstreams, encoding, body, reason):
    odd = upstreams(lambda r: json_answer(200, body, headers={"content-encoding": encoding}))
    good = upstreams()
    gw = gateway(channel("odd", odd.url + "/v1"), channel("good", good.url + "/v1", keys=(UPSTREAM_KEYS[1],)))
    for stream in (False, True):
        answer = post(gw, stream)
        assert answer.status_code == 200 and answer.headers["x-ccx-channel"] == "good"
        assert "content-encoding" not in answer.headers
    alone = gateway(channel("odd", odd.url + "/v1"))
    answer = post(alone, stream=False)
    assert answer.status_code == 502 and reason in answer.json()["error"]["message"]


def test_undecodable_stream_ends_with_an_error_event(gateway, upstreams):
    def bad_gzip_stream(received):
        good = gzip.compress(b'data: {"choices": []}\n\n')
        return sse_answer([good[:-8], b"garbage that is not deflate data"], delay=0.2, headers={"content-encoding": "gzip"})

    up = upstreams(bad_gzip_stream)
    answer = post(gateway(channel("bad", up.url + "/v1")), stream=True)
    assert answer.status_code == 200 and "content-encoding" not in answer.headers
    assert answer.text.startswith('data: {"choices": []}\n\n')
    error = json.loads(answer.text.rstrip().split("\n")[-1][6:])["error"]
    assert error["code"] == "stream_interrupted" and "invalid gzip body" in error["message"]


def test_stream_decoder_passes_each_flushed_event_on_at_once():
    from ccx_addon.encodings import StreamDecoder

    compressor = zlib.compressobj(wbits=31)
    decoder = StreamDecoder("gzip")
    events = chunk_events("m", ["a", "b"])
    for event in events:
        assert decoder.feed(compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)) == event
    assert decoder.feed(compressor.flush()) + decoder.end() == b""
