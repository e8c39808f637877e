"""Issue 9, item 6: no secret the config holds comes back out of the gateway, whatever the
upstream echoes and wherever: the client's answer (body and headers), the console at
flow_detail=4, a `-w` flow file and mitmweb's API. Against real `mitmdump`/`mitmweb -s
ccx_addon/addon.py` subprocesses and an upstream that quotes every credential it received:
in SSE error events (also split across two chunks), in a response header, in a
gzip-encoded error body and in a 200 JSON body. Secrets: the proxy key, the upstream key,
a `channels[].headers` value and the credentials in `base_url`."""

import base64
import gzip
import json

import httpx
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, config
from fakeupstream import chunk, http_head, json_answer
from gateway_process import start_gateway
from webapi import start_mitmweb

HEADER_SECRET = "hdr-secret-4f9e2d1c8b7a"
URL_USER, URL_PASSWORD = "ccxuser", "url-password-6d5c4b3a"
BASIC = base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()
SECRETS = (PROXY_KEY, UPSTREAM_KEYS[0], HEADER_SECRET, URL_PASSWORD, BASIC)
MASK = "[ccx: redacted]"


def echoed(received) -> str:
    """Every credential the upstream was sent, as a careless upstream quotes them."""
    basic = received.headers.get("authorization", "").removeprefix("Basic ")
    password = base64.b64decode(basic).decode().split(":", 1)[1] if basic else ""
    return f"key {received.headers['x-api-key']} header {received.headers['api-key']} basic {basic} password {password}"


def sse_head(extra: dict | None = None) -> bytes:
    return http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked", **(extra or {})})


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def content(text: str) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def split_inside(data: bytes, secret: str) -> tuple[bytes, bytes]:
    cut = data.index(secret.encode()) + len(secret) // 2
    return data[:cut], data[cut:]


def leaky(received):
    model = received.json["model"]
    text = echoed(received)
    if model == "sse-error":
        return [("send", sse_head()), ("send", chunk(event(content("hi")))),
                ("send", chunk(event({"error": {"message": text, "type": "x", "code": "bad_key"}}))),
                ("send", chunk(b"data: [DONE]\n\n")), ("send", b"0\r\n\r\n")]
    if model == "sse-split":
        # Each secret cut in two transport chunks, with a pause so they arrive apart.
        data = event(content(text)) + b"data: [DONE]\n\n"
        steps = [("send", sse_head())]
        for secret in (UPSTREAM_KEYS[0], HEADER_SECRET, URL_PASSWORD):
            first, data = split_inside(data, secret)
            steps += [("send", chunk(first)), ("sleep", 0.15)]
        return steps + [("send", chunk(data)), ("send", b"0\r\n\r\n")]
    if model == "header":
        return json_answer(200, completion_with("fine"), headers={"x-echo": text.replace(" ", "_")})
    if model == "gzip-error":
        body = gzip.compress(json.dumps({"error": {"message": text, "type": "x", "param": None, "code": None}}).encode())
        return json_answer(400, body, headers={"content-encoding": "gzip"})
    return json_answer(200, completion_with(text))  # "json200"


def completion_with(text: str) -> dict:
    return {"id": "c", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def leaky_config(port: int) -> str:
    return config(
        f"  - name: leaky\n"
        f"    base_url: http://{URL_USER}:{URL_PASSWORD}@127.0.0.1:{port}/v1\n"
        f'    api_keys: ["{UPSTREAM_KEYS[0]}"]\n'
        f"    auth_header: x-api-key\n"
        f'    headers: {{api-key: "{HEADER_SECRET}", x-title: "ccx tests"}}\n'
    )


def ask_everything(gateway_url: str) -> list[httpx.Response]:
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    answers = []
    for model, stream in (("sse-error", True), ("sse-split", True), ("header", False), ("gzip-error", False), ("json200", False)):
        answers.append(httpx.post(gateway_url + "/v1/chat/completions", headers=auth, timeout=15,
                                  json={"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
    return answers


def check_answers(answers: list[httpx.Response]) -> None:
    sse_error, sse_split, header, gzip_error, json200 = answers
    for answer in answers:
        shown = answer.text + json.dumps(list(answer.headers.items()))
        for secret in SECRETS:
            assert secret not in shown, (answer.request.content[:40], secret)
    # The upstream did echo each secret, and each was masked where it was.
    assert sse_error.text.count(MASK) == 4 and "data: [DONE]" in sse_error.text
    assert sse_split.text.count(MASK) == 4 and "data: [DONE]" in sse_split.text
    assert header.headers["x-echo"].count(MASK) == 4
    assert gzip_error.status_code == 400 and "content-encoding" not in gzip_error.headers
    assert gzip_error.json()["error"]["message"].count(MASK) == 4  # decoded, then scrubbed
    assert json200.json()["choices"][0]["message"]["content"].count(MASK) == 4


def assert_nowhere(texts: list[bytes]) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret.encode() not in text, secret


def test_no_secret_leaves_mitmdump(upstreams, write_config, tmp_path):
    upstream = upstreams(leaky)
    flows_file = tmp_path / "flows.mitm"
    gw = start_gateway(write_config(leaky_config(upstream.port)), tmp_path, "-w", str(flows_file), "--set", "flow_detail=4")
    try:
        answers = ask_everything(gw.url)
    finally:
        gw.stop()
    received = upstream.received[0]
    assert received.headers["api-key"] == HEADER_SECRET and received.headers["x-api-key"] == UPSTREAM_KEYS[0]
    assert received.headers["authorization"] == f"Basic {BASIC}"
    check_answers(answers)
    log, saved = gw.log(), flows_file.read_bytes()
    assert "sse-split" in log and b"sse-split" in saved and MASK in log  # the detail is really there
    assert_nowhere([log.encode(), saved])


def test_no_secret_in_mitmweb(upstreams, write_config, tmp_path):
    upstream = upstreams(leaky)
    gw, api = start_mitmweb(write_config(leaky_config(upstream.port)), tmp_path, "--set", "flow_detail=4")
    try:
        check_answers(ask_everything(gw.url))
        flows = api.get("/flows").json()
        shown = [api.get("/flows").content, api.get("/flows/dump").content, api.get("/events").content]
        for flow in flows:
            for message in ("request", "response"):
                shown.append(api.get(f"/flows/{flow['id']}/{message}/content.data").content)
        assert sum(f["request"]["path"].endswith("/chat/completions") for f in flows) == 5
        assert b"sse-split" in shown[1]
        assert_nowhere(shown + [gw.log().encode()])
    finally:
        gw.stop()
        api.close()


def test_check_and_explain_mask_base_url_credentials_and_header_values(write_config):
    path = write_config(leaky_config(4242))
    for argv in (["check", "--config", str(path)], ["explain", "gpt-5", "--config", str(path)]):
        result = run_cli(argv)
        assert "http://[ccx: redacted]@127.0.0.1:4242/v1/chat/completions" in result, result
        for secret in SECRETS:
            assert secret not in result
    assert "headers: api-key, x-title" in run_cli(["check", "--config", str(path)])


def run_cli(argv: list[str]) -> str:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "ccx-addon"
    result = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=30,
                            env={"PROXY_ACCESS_KEY": PROXY_KEY, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.parametrize("cut", range(1, 12))
def test_stream_scrubber_masks_a_secret_split_anywhere_without_holding_other_bytes(cut):
    from ccx_addon.redact import StreamScrubber

    secret = UPSTREAM_KEYS[0]
    data = f"data: {{\"x\": \"{secret}\"}}\n\n".encode()
    position = data.index(secret.encode()) + cut
    scrubber = StreamScrubber(SECRETS)
    first = scrubber.feed(data[:position])
    # Only the start of the secret waits; the event's beginning went out at once.
    assert first == data[:data.index(secret.encode())]
    assert first + scrubber.feed(data[position:]) + scrubber.end() == f"data: {{\"x\": \"{MASK}\"}}\n\n".encode()
    # A tail that only looks like the start of a secret is released at the end.
    scrubber = StreamScrubber(SECRETS)
    assert scrubber.feed(b"data: sk-up") == b"data: " and scrubber.end() == b"sk-up"
    assert scrubber.feed(b"data: done\n\n") == b"data: done\n\n"
