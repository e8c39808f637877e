"""The status view: `ccx-addon status` asks a running `mitmdump -s ccx_addon/addon.py` over
HTTP (with the proxy key) and prints each channel's keys, breaker and counts; `ccx.status`
answers the same in the command bar and writes it to the log."""

import os
import re
import signal
import time
import subprocess

import httpx

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import json_answer, openai_like
from harness import BIN, ROOT

from ccx_addon.statusreport import Counters, format_status

COOLING, DISABLED, GOOD = UPSTREAM_KEYS


def by_key(received):
    key = received.headers["authorization"].removeprefix("Bearer ")
    if key == COOLING:
        return json_answer(429, {"error": {"message": "slow down", "type": "x", "param": None, "code": None}}, {"retry-after": "600"})
    if key == DISABLED:
        return json_answer(401, {"error": {"message": "bad key", "type": "x", "param": None, "code": None}})
    return openai_like(received)


def down(received):
    return json_answer(503, {"error": {"message": "down", "type": "x", "param": None, "code": None}})


def ccx_status(*args, key=PROXY_KEY):
    env = {k: v for k, v in os.environ.items() if k != "PROXY_ACCESS_KEY"}
    if key:
        env["PROXY_ACCESS_KEY"] = key
    return subprocess.run([str(BIN / "ccx-addon"), "status", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=30)


def test_status_shows_keys_breakers_and_counts_of_a_running_gateway(mitmdump, upstreams):
    pool, broken = upstreams(by_key), upstreams(down)
    gw = mitmdump(config(
        channel("pool", pool.url + "/v1", keys=(COOLING, DISABLED, GOOD), extra='supported_models: ["m"]'),
        channel("broken", broken.url + "/v1", extra='supported_models: ["b-*"]'),
        top="circuit_breaker: {consecutive_failures: 1, backoff: 300}\n",
    ))
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    url = gw.url + "/v1/chat/completions"
    # pool#1 cools down (429), pool#2 is disabled (401), pool#3 answers.
    assert httpx.post(url, json={"model": "m", "messages": []}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(url, json={"model": "m", "stream": True, "messages": []}, headers=auth, timeout=10).status_code == 200
    # broken fails once: its breaker opens.
    assert httpx.post(url, json={"model": "b-1", "messages": []}, headers=auth, timeout=10).status_code == 503

    # A stream is counted when its response hook runs, which may be after its client is done.
    deadline = time.time() + 5
    while gw.log().count("POST /v1/chat/completions ") < 3 and time.time() < deadline:
        time.sleep(0.05)
    result = ccx_status("--url", gw.url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert lines[0].startswith("ccx-addon status since ")
    assert lines[1].split() == ["channel", "breaker", "requests", "failures", "tokens", "in", "tokens", "out", "p50", "ttft"]
    pool_row = next(line for line in lines if line.startswith("pool "))
    # 4 upstream requests (429, 401, 200, then the stream on pool#3), 2 failed; 11+11 in, 7+3 out.
    assert pool_row.split()[:6] == ["pool", "closed", "4", "2", "22", "10"] and pool_row.endswith("ms")
    assert re.search(r"    key pool#1: cooling until \d\d:\d\d:\d\d \((600|599)s\)", out), out
    assert "    key pool#2: disabled because 401 key rejected" in out
    assert "    key pool#3: ready" in out
    broken_row = next(line for line in lines if line.startswith("broken "))
    assert re.match(r"broken +open, next probe in (300|299)s +1 ", broken_row), broken_row
    assert broken_row.split()[-4:] == ["1", "0", "0", "-"]
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret not in out

    # Without the proxy key: refused, and said so.
    refused = ccx_status("--url", gw.url, key="wrong-key")
    assert refused.returncode == 1 and "answered 401" in refused.stderr and "proxy access key" in refused.stderr
    assert httpx.get(gw.url + "/ccx/status", timeout=10).status_code == 401
    missing = ccx_status("--url", gw.url, key="")
    assert missing.returncode == 1 and "set PROXY_ACCESS_KEY" in missing.stderr

    # mitmdump has no command bar: SIGUSR1 writes the same table to its log.
    gw.process.send_signal(signal.SIGUSR1)
    deadline = time.time() + 5
    while "    key pool#2: disabled because 401 key rejected" not in gw.log() and time.time() < deadline:
        time.sleep(0.05)
    assert "    key pool#2: disabled because 401 key rejected" in gw.log()


def test_status_command_answers_and_logs(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")))
    assert httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                      headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10).status_code == 200
    table = gw.call(gw.master.commands.call, "ccx.status")
    row = next(line for line in table.splitlines() if line.startswith("main "))
    assert row.split()[:6] == ["main", "closed", "1", "0", "11", "7"]
    assert "    key main#1: ready" in table


def test_counters_take_requests_failures_tokens_and_the_median_first_token():
    counters = Counters()
    counters.count({"channel": "a", "stream": True, "status": 200, "ttft_ms": 30, "usage": {"prompt_tokens": 5, "completion_tokens": 2},
                    "attempts": [{"channel": "b", "outcome": "503 x", "ok": False}, {"channel": "a", "outcome": "200", "ok": True}]})
    counters.count({"channel": "a", "stream": False, "status": 200, "ttfb_ms": 10, "attempts": [{"channel": "a", "ok": True}]})
    counters.count({"channel": "a", "stream": False, "status": 200, "ttfb_ms": 20, "attempts": [{"channel": "a", "ok": True}]})
    counters.count({"channel": None, "attempts": [{"channel": "c", "outcome": "skipped: circuit open"}]})
    assert counters.channels["a"].as_dict() == {"requests": 3, "failures": 0, "tokens_in": 5, "tokens_out": 2, "ttft_p50_ms": 20}
    assert counters.channels["b"].as_dict()["failures"] == 1 and "c" not in counters.channels
    text = format_status({"since": 0, "channels": [{
        "name": "a", "breaker": {"state": "open", "open_until": 130}, "keys": [
            {"key": "a#1", "disabled": None, "cooling_until": 160}, {"key": "a#2", "disabled": "402 payment required", "cooling_until": 0}],
        **counters.channels["a"].as_dict()}]}, now=100)
    assert "open, next probe in 30s" in text and "key a#2: disabled because 402 payment required" in text
    assert "key a#1: cooling until " in text and "(60s)" in text


def test_status_shows_bound_sessions_and_keys_at_their_limit(gateway, upstreams):
    up = upstreams()
    keys = f'[{{key: "{UPSTREAM_KEYS[0]}", rpm: 1}}, "{UPSTREAM_KEYS[1]}"]'
    gw = gateway(config(f"  - name: main\n    base_url: {up.url}/v1\n    api_keys: {keys}\n"))
    # One session's request: bound to main#1 (the first in rotation), which has used its rpm.
    assert httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                      headers={"authorization": f"Bearer {PROXY_KEY}", "x-session-id": "ses_status_test_1"},
                      timeout=10).status_code == 200
    table = gw.call(gw.master.commands.call, "ccx.status")
    assert re.search(r"    key main#1: at its limit: rpm 1 reached, a slot frees in \d+s; 1 session\n", table + "\n"), table
    assert "    key main#2: ready\n" in table + "\n"
    for secret in UPSTREAM_KEYS:
        assert secret not in table
