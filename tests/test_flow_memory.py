"""Issue 9, item 8: mitmweb's flow memory is bounded. A real `mitmweb -s ccx_addon/addon.py`
subprocess: finished flows keep at most `ccx_flow_body_limit` of each body and
`ccx_flows_memory` in total (oldest cut first), each cut is noted in the flow, clients still
get whole answers, and RSS does not keep what was cut."""

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import PROXY_KEY, channel, config
from fakeupstream import json_answer, sse_answer
from webapi import start_mitmweb

AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
ANSWER_TEXT = "y" * 300_000


def big_answers(received):
    if received.json.get("stream"):
        event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "z" * 50_000}}]}).encode() + b"\n\n"
        return sse_answer([event] * 6 + [b"data: [DONE]\n\n"])
    return json_answer(200, {"id": "c", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": ANSWER_TEXT}, "finish_reason": "stop"}]})


@pytest.fixture
def web(upstreams, write_config, tmp_path):
    started = []

    def start(*options: str):
        up = upstreams(big_answers)
        gw, api = start_mitmweb(write_config(config(channel("big", up.url + "/v1"))), tmp_path,
                                *[a for option in options for a in ("--set", option)])
        started.append((gw, api))
        return gw, api

    yield start
    for gw, api in started:
        gw.stop()
        api.close()


def ask(gw, prompt_bytes: int, stream: bool = False) -> httpx.Response:
    return httpx.post(gw.url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "m", "stream": stream, "messages": [{"role": "user", "content": "x" * prompt_bytes}]})


def chat_flows(api) -> list[dict]:
    flows = [f for f in api.get("/flows").json() if f["request"]["path"].endswith("/chat/completions")]
    return sorted(flows, key=lambda f: f["timestamp_created"])


def cut_of(message: dict) -> str | None:
    return dict((k.lower(), v) for k, v in message["headers"]).get("x-ccx-body-cut")


def test_finished_flows_keep_bounded_bodies_and_say_what_was_cut(web):
    gw, api = web("ccx_flow_body_limit=64k", "ccx_flows_memory=300k")
    for _ in range(4):
        answer = ask(gw, 1_000_000)
        assert answer.json()["choices"][0]["message"]["content"] == ANSWER_TEXT  # the client got it whole
    streamed = ask(gw, 10, stream=True)
    assert streamed.text.count("z" * 50_000) == 6

    # Bodies are cut once mitmproxy has sent the answer, a moment after the client has it.
    deadline = time.time() + 10
    while True:
        flows = chat_flows(api)
        sizes = [len(api.get(f"/flows/{flow['id']}/{part}/content.data").content)
                 for flow in flows for part in ("request", "response")]
        if (len(flows) == 5 and sum(sizes) <= 300 * 1024 and max(sizes) <= 64 * 1024) or time.time() > deadline:
            break
        time.sleep(0.1)
    flows = chat_flows(api)  # read again: the headers as they are now
    assert len(flows) == 5
    assert max(sizes) <= 64 * 1024 and sum(sizes) <= 300 * 1024, sizes
    newest_request = flows[-2]["request"]
    assert cut_of(newest_request).startswith("kept 65536 of ") and cut_of(newest_request).endswith(" bytes (ccx_flow_body_limit)")
    assert int(cut_of(newest_request).split(" of ")[1].split()[0]) > 1_000_000
    assert cut_of(flows[-2]["response"]) == f"kept 65536 of {len(answer.content)} bytes (ccx_flow_body_limit)"
    assert cut_of(flows[-1]["response"]).startswith("kept 65536 of ")  # the stream, too
    # Over the total: the oldest flows gave up their bodies first.
    oldest = flows[0]
    assert cut_of(oldest["request"]).startswith("kept 0 of ") and cut_of(oldest["request"]).endswith("(ccx_flows_memory)")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_mitmweb_does_not_keep_big_request_bodies(web):
    gw, api = web()
    ask(gw, 1000)
    before = rss_mb(gw.process.pid)
    requests, size_mb = 12, 10
    for _ in range(requests):
        assert ask(gw, size_mb * 1024 * 1024).status_code == 200
    deadline = time.time() + 10
    while not cut_of(chat_flows(api)[-1]["request"]) and time.time() < deadline:
        time.sleep(0.1)  # the last flow is cut a moment after its answer went out
    flows = chat_flows(api)
    assert len(flows) == requests + 1 and all(cut_of(f["request"]) for f in flows[1:])
    grown = rss_mb(gw.process.pid) - before
    # Before the bounds, mitmweb kept two copies of every body (~240 MB here, for good);
    # now at most 1 MB a body, plus what the allocator keeps of the last requests
    # (25-36 MB measured).
    assert grown < requests * size_mb * 0.5, f"RSS grew {grown:.0f} MB"
