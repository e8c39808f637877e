"""Upstream answers judged end to end (issues 8 and 9): each provider's real error shapes
through a running gateway disable or cool the right key; error-first 200 streams, HTML
and redirects fail over; learned output caps; the upstream model lists in /v1/models."""

import json
import time

import httpx

import pytest

from chatclient import AUTH, ask, chat_flows, error_of, events, health, post, streamed_text, wait_until
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk, chunk_events, http_head, json_answer, openai_like, sse_answer
from gateway_process import start_gateway
from test_verdicts import (
    DEEPSEEK_BALANCE, DEEPSEEK_CAP, GLM_5H, GLM_BALANCE, GLM_RATE, KIMI_BUSY, KIMI_QUOTA, KIMI_RATE,
    MINIMAX_BALANCE, MINIMAX_TWO_SYSTEMS, OPENAI_MODEL_ECHO, OPENAI_QUOTA, OPENAI_RATE,
)

K1, K2, K3 = UPSTREAM_KEYS


def key_of(received) -> str:
    return received.headers["authorization"].removeprefix("Bearer ")


def by_key(answers: dict):
    return lambda r: answers.get(key_of(r), openai_like)(r)


def chats(up) -> list:
    """What reached the upstream's chat endpoint (a preset channel also fetches /models)."""
    return [x for x in up.received if x.path.endswith("/chat/completions")]


def raw_json(status: int, body: bytes, headers=None):
    return lambda r: json_answer(status, body, headers)


def keys_of(gw, name: str) -> list[dict]:
    return health(gw)[name]["keys"]


# --- provider error shapes: which key is disabled, which cools down ---------------------------

PROVIDER_ANSWERS = {
    # name: (preset, status, body, "disabled" | "cooling")
    "glm 1113 balance": ("glm", 429, GLM_BALANCE, "disabled"),
    "glm 1302 rate limit": ("glm", 429, GLM_RATE, "cooling"),
    "deepseek 402": ("deepseek", 402, DEEPSEEK_BALANCE, "disabled"),
    "minimax 200 base_resp 1008": ("minimax", 200, MINIMAX_BALANCE, "disabled"),
    "kimi exceeded_current_quota_error": ("kimi", 429, KIMI_QUOTA, "disabled"),
    "kimi rate_limit_reached_error": ("kimi", 429, KIMI_RATE, "cooling"),
    "openai insufficient_quota": ("openai", 429, OPENAI_QUOTA, "disabled"),
    "openai rate_limit_exceeded": ("openai", 429, OPENAI_RATE, "cooling"),
}


@pytest.mark.parametrize("case", list(PROVIDER_ANSWERS))
def test_provider_errors_disable_or_cool_the_key(gateway, upstreams, case):
    preset, status, body, penalty = PROVIDER_ANSWERS[case]
    up = upstreams(by_key({K1: raw_json(status, body)}))
    gw = gateway(config(channel("p", up.url + "/v1", keys=(K1, K2), extra=f"preset: {preset}")))
    for stream in (False, True):
        r = ask(gw, stream=stream)
        assert r.status_code == 200 and r.headers["x-ccx-attempts"] == ("2" if not stream else "1")
    assert [key_of(x) for x in chats(up)] == [K1, K2, K2]
    first, second = keys_of(gw, "p")
    assert second == {"key": "p#2", "disabled": None, "cooling_for_s": 0, "sessions": 0}
    if penalty == "disabled":
        assert first["disabled"].startswith(f"{status} quota or balance used up" if status != 402 else "402 ")
    else:
        assert first["disabled"] is None and first["cooling_for_s"] > 0
    [flow, *_] = chat_flows(gw, 2)
    assert "p (p#1): " + str(status) in flow.comment and "failover" in flow.comment


def test_glm_1308_cools_the_key_until_the_announced_reset(gateway, upstreams):
    china = time.gmtime(time.time() + 8 * 3600 + 2 * 3600)  # two hours from now, in China time
    body = json.dumps({"error": {"code": "1308", "message": "已达到 5 小时的使用上限。您的限额将在 "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S', china)} 重置。"}}).encode()
    assert GLM_5H != body  # the fixture's date is far away; this one is near
    up = upstreams(by_key({K1: raw_json(429, body, {"retry-after": "5"})}))
    gw = gateway(config(channel("glm", up.url + "/v1", keys=(K1, K2), extra="preset: glm")))
    assert ask(gw).status_code == 200
    cooling = keys_of(gw, "glm")[0]["cooling_for_s"]
    assert 2 * 3600 - 60 < cooling <= 2 * 3600  # the reset, not Retry-After or the default


def test_overloaded_moves_to_the_next_channel_and_counts_against_it(gateway, upstreams):
    busy = upstreams(raw_json(429, KIMI_BUSY))
    ok = upstreams()
    gw = gateway(config(
        channel("kimi", busy.url + "/v1", keys=(K1, K2), extra="preset: kimi"),
        channel("backup", ok.url + "/v1", keys=(K3,)),
        top="circuit_breaker: {consecutive_failures: 1}\n",
    ))
    r = ask(gw)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "backup"
    assert len(chats(busy)) == 1  # not the next key: the engine, not the key, is busy
    state = health(gw)["kimi"]
    assert state["circuit"] == "open"
    assert all(k["disabled"] is None and k["cooling_for_s"] == 0 for k in state["keys"])


def test_minimax_request_error_in_a_200_is_told_to_the_client(gateway, upstreams):
    up = upstreams(raw_json(200, MINIMAX_TWO_SYSTEMS))
    other = upstreams()
    gw = gateway(config(channel("mm", up.url + "/v1", keys=(K1, K2), extra="preset: minimax"),
                        channel("other", other.url + "/v1", keys=(K3,))))
    r = ask(gw)
    assert r.status_code == 400
    error = error_of(r)
    assert error["code"] == "upstream_rejected_request" and "2013" in error["message"]
    assert len(chats(up)) == 1 and not other.received  # every channel would refuse it
    assert all(k["disabled"] is None for k in keys_of(gw, "mm"))


def test_a_model_name_quoting_quota_words_disables_nothing_in_mitmdump(upstreams, write_config, tmp_path):
    """Issue 9, item 3: a 404 that quotes the client's model `gpt-insufficient_quota` back
    once disabled every key it reached. Now only structured fields decide."""
    def quote_model(r):
        model = r.json["model"]
        return json_answer(404, {"error": {
            "message": f"The model `{model}` does not exist (insufficient_quota, 余额, \"1113\", exceeded_current_quota_error)",
            "type": "invalid_request_error", "param": None, "code": "model_not_found"}})

    a, b = upstreams(quote_model), upstreams(quote_model)
    gw = start_gateway(write_config(config(
        channel("oa", a.url + "/v1", keys=(K1, K2), extra='preset: openai\nsupported_models: ["gpt-*"]'),
        channel("glm", b.url + "/v1", keys=(K3,), extra='preset: glm\nsupported_models: ["gpt-*"]'),
    )), tmp_path)
    try:
        for stream in (False, True, False):
            r = ask(gw, model="gpt-insufficient_quota", stream=stream)
            assert r.status_code == 404 and "gpt-insufficient_quota" in error_of(r)["message"]
        state = httpx.get(gw.url + "/health", headers=AUTH, timeout=5).json()["channels"]
        for name in ("oa", "glm"):
            assert state[name]["circuit"] == "closed"
            assert all(k["disabled"] is None and k["cooling_for_s"] == 0 for k in state[name]["keys"]), state
        # Every key still serves.
        a.behaviour = b.behaviour = openai_like
        assert [ask(gw, model="gpt-5").status_code for _ in range(2)] == [200, 200]
        assert {key_of(x) for x in chats(a)[-2:]} == {K1, K2}
        log = gw.log()
        assert PROXY_KEY not in log and K1 not in log and "disabled" not in log
    finally:
        gw.stop()


# --- errors inside a 200 stream, before any byte reached the client ---------------------------

def error_first_stream(first: bytes, then: list[bytes] = ()):
    return lambda r: sse_answer([first, *then])


OPENAI_STYLE_429 = b'data: {"error": {"message": "Rate limit exceeded, retry later", "type": "rate_limit_error", "code": 429}}\n\n'
MINIMAX_1008 = (b'data: {"id": "x", "choices": null, "base_resp": {"status_code": 1008, '
                b'"status_msg": "insufficient balance"}}\n\n')
SERVER_ERROR_FIRST = b'data: {"error": {"message": "upstream model crashed", "type": "server_error"}}\n\n'


@pytest.mark.parametrize("first, preset, penalty", [
    (OPENAI_STYLE_429, "", "cooling"),
    (MINIMAX_1008, "minimax", "disabled"),
    (b": keep-alive\n\n" + SERVER_ERROR_FIRST, "", "breaker"),
])
def test_error_first_streams_fail_over(gateway, upstreams, first, preset, penalty):
    bad = upstreams(error_first_stream(first, chunk_events("m", ["never", " seen"])))
    good = upstreams()
    gw = gateway(config(
        channel("bad", bad.url + "/v1", keys=(K1,), extra=f"preset: {preset}" if preset else ""),
        channel("good", good.url + "/v1", keys=(K3,)),
        top="circuit_breaker: {consecutive_failures: 1}\n",
    ))
    r = ask(gw, stream=True)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "good"
    assert streamed_text(events(r.text)) == "hello from upstream" and "never" not in r.text
    state = health(gw)["bad"]
    key = state["keys"][0]
    if penalty == "cooling":
        assert key["cooling_for_s"] > 0 and state["circuit"] == "closed"
    elif penalty == "disabled":
        assert key["disabled"].startswith("200 stream, first event: quota or balance used up")
    else:
        assert state["circuit"] == "open" and key["disabled"] is None and key["cooling_for_s"] == 0
    [flow] = chat_flows(gw, 1)
    record = flow.metadata["ccx"]
    assert record["channel"] == "good"
    assert "bad (bad#1): 200 stream, first event: " in flow.comment


def test_error_first_stream_everywhere_is_an_error_not_a_success(gateway, upstreams):
    bad = upstreams(error_first_stream(SERVER_ERROR_FIRST))
    gw = gateway(config(channel("bad", bad.url + "/v1", keys=(K1,))))
    r = ask(gw, stream=True)
    assert r.status_code == 502
    assert "upstream model crashed" in error_of(r)["message"]
    [flow] = chat_flows(gw, 1)
    assert flow.comment.startswith("✗ failed 502") and "| 502 stream |" in flow.comment
    assert "bad (bad#1): 200 stream, first event: upstream model crashed" in flow.comment


def test_normal_streams_pass_with_their_first_bytes(gateway, upstreams):
    events_ = [b": keep-alive\n\n", *chunk_events("m", ["a", "b", "c"])]
    up = upstreams(lambda r: sse_answer(events_, delay=0.05))
    gw = gateway(config(channel("up", up.url + "/v1", keys=(K1,))))
    r = ask(gw, stream=True)
    assert r.status_code == 200
    assert r.text.startswith(": keep-alive\n\n") and r.text.endswith("data: [DONE]\n\n")
    assert streamed_text(events(r.text)) == "abc"
    assert health(gw)["up"]["keys"][0]["cooling_for_s"] == 0


def test_stream_that_never_sends_an_event_fails_over(gateway, upstreams):
    silent = upstreams(lambda r: [("send", http_head(200, {"content-type": "text/event-stream",
                                                            "transfer-encoding": "chunked"})),
                                  ("send", chunk(b": keep-alive\n\n")), ("hang",)])
    good = upstreams()
    gw = gateway(config(channel("silent", silent.url + "/v1", keys=(K1,), extra="timeouts: {response_headers: 0.5}"),
                        channel("good", good.url + "/v1", keys=(K3,))))
    r = ask(gw, stream=True)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "good"
    [flow] = chat_flows(gw, 1)
    assert "no stream event within 0.5s" in flow.comment


# --- answers that are not what a chat request expects: HTML, redirects ------------------------

HTML = b"<!DOCTYPE html><html><body><form>Sign in</form></body></html>"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("answer, outcome", [
    (lambda r: [("send", http_head(200, {"content-type": "text/html; charset=utf-8",
                                         "content-length": str(len(HTML))}) + HTML)],
     "200 text/html where JSON was expected"),
    (lambda r: [("send", http_head(302, {"location": "https://login.example/", "content-length": "0"}))],
     "302 redirect"),
])
def test_html_and_redirects_fail_over(gateway, upstreams, answer, outcome, stream):
    odd = upstreams(answer)
    good = upstreams()
    gw = gateway(config(channel("odd", odd.url + "/v1", keys=(K1,)), channel("good", good.url + "/v1", keys=(K3,)),
                        top="circuit_breaker: {consecutive_failures: 1}\n"))
    r = ask(gw, stream=stream)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "good"
    assert "Sign in" not in r.text
    assert health(gw)["odd"]["circuit"] == "open"  # a breaker failure, not a success
    [flow] = chat_flows(gw, 1)
    assert f"odd (odd#1): {outcome}" in flow.comment
    attempts = flow.metadata["ccx"]["attempts"]
    assert attempts[0]["outcome"] == outcome and attempts[1]["outcome"] == "200"


@pytest.mark.parametrize("answer, outcome", [
    (lambda r: [("send", http_head(200, {"content-type": "text/html", "content-length": str(len(HTML))}) + HTML)],
     "200 text/html where JSON was expected"),
    (lambda r: [("send", http_head(302, {"location": "https://login.example/", "content-length": "0"}))],
     "302 redirect"),
])
def test_html_or_redirect_from_the_only_channel_is_a_502_naming_it(gateway, upstreams, answer, outcome):
    odd = upstreams(answer)
    gw = gateway(config(channel("odd", odd.url + "/v1", keys=(K1,))))
    for stream in (False, True):
        r = ask(gw, stream=stream)
        assert r.status_code == 502 and "location" not in r.headers
        assert f"odd (odd#1): {outcome}" in error_of(r)["message"]


# --- learned output caps ------------------------------------------------------------------

def deepseek_caps(r):
    data = r.json
    if data.get("max_tokens", 0) > 8192:
        return json_answer(400, DEEPSEEK_CAP)
    return openai_like(r)


def test_an_announced_cap_is_retried_once_on_the_same_key_and_remembered(gateway, upstreams):
    up = upstreams(deepseek_caps)
    # A model the deepseek preset has no static cap for: the cap is learnt from the answer.
    gw = gateway(config(channel("ds", up.url + "/v1", keys=(K1, K2), extra="preset: deepseek\nmodel_mapping: {gpt: deepseek-v9}")))
    body = {"model": "gpt-5", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}]}
    r = post(gw, body)
    assert r.status_code == 200
    first, retry = chats(up)
    assert key_of(first) == key_of(retry) == K1  # the same key
    assert (first.json["max_tokens"], retry.json["max_tokens"]) == (32000, 8192)
    assert retry.json["messages"] == body["messages"] and retry.json["model"] == "deepseek-v9"
    assert all(k["disabled"] is None and k["cooling_for_s"] == 0 for k in keys_of(gw, "ds"))
    # Remembered: the next request is sent within the cap at once, streamed or not.
    for stream in (False, True):
        assert post(gw, {**body, "stream": stream}).status_code == 200
    assert [x.json["max_tokens"] for x in chats(up)[2:]] == [8192, 8192]
    # Values within the cap are untouched.
    post(gw, {**body, "max_tokens": 100})
    assert chats(up)[-1].json["max_tokens"] == 100
    [flow, *_] = chat_flows(gw, 1)
    assert "output cap 8192 learnt, retrying" in flow.comment


def test_a_cap_is_retried_only_once(gateway, upstreams):
    up = upstreams(raw_json(400, DEEPSEEK_CAP))  # refuses whatever it gets
    gw = gateway(config(channel("ds", up.url + "/v1", keys=(K1,), extra="preset: deepseek")))
    r = post(gw, {"model": "m", "max_tokens": 32000, "messages": []})
    assert r.status_code == 400 and "valid range of max_tokens" in error_of(r)["message"]
    assert len(chats(up)) == 2


# --- /v1/models with the upstreams' own lists -------------------------------------------------

def with_models(names, hang=False):
    def behaviour(r):
        if r.method == "GET" and r.path == "/v1/models":
            if hang:
                return [("hang",)]
            return json_answer(200, {"object": "list", "data": [{"id": n, "object": "model"} for n in names]})
        return openai_like(r)
    return behaviour


def listed(gw) -> list[str]:
    r = httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=5)
    assert r.status_code == 200
    return [m["id"] for m in r.json()["data"]]


def test_models_include_the_upstream_list_filtered_by_the_allowlist(gateway, upstreams):
    ds = upstreams(with_models(["deepseek-chat", "deepseek-reasoner", "other-model"]))
    plain = upstreams(with_models(["plain-upstream-model"]))
    gw = gateway(config(
        channel("ds", ds.url + "/v1", keys=(K1,), extra='preset: deepseek\nsupported_models: ["deepseek-*", "gpt-5"]'),
        channel("plain", plain.url + "/v1", keys=(K2,)),  # no preset: not fetched
    ))
    assert wait_until(lambda: "deepseek-chat" in listed(gw), timeout=10)
    names = listed(gw)
    assert {"deepseek-chat", "deepseek-reasoner", "gpt-5"} <= set(names)
    assert "other-model" not in names and "plain-upstream-model" not in names
    [fetch] = [x for x in ds.received if x.method == "GET"]
    assert fetch.path == "/v1/models" and key_of(fetch) == K1
    assert not [x for x in plain.received if x.method == "GET"]
    # Clients can ask for what is listed.
    r = httpx.get(gw.url + "/v1/models/deepseek-reasoner", headers=AUTH, timeout=5)
    assert r.status_code == 200 and r.json()["owned_by"] == "ds"


def test_models_never_wait_for_an_upstream(gateway, upstreams):
    hanging = upstreams(with_models([], hang=True))
    gw = gateway(config(channel("kimi", hanging.url + "/v1", keys=(K1,),
                                extra='preset: kimi\nsupported_models: ["kimi-k2"]\nlist_upstream_models: true')))
    assert wait_until(lambda: any(x.method == "GET" for x in hanging.received), timeout=10)
    # The fetch hangs (for an hour); the list still answers, from the config.
    assert listed(gw) == ["kimi-k2"]
    assert ask(gw, model="kimi-k2").status_code == 200


def test_an_upstream_echoing_the_key_in_its_error_leaks_it_nowhere_in_mitmdump(upstreams, write_config, tmp_path):
    """The disable reason quotes the upstream's message, which may quote the key: /health,
    the answer and the log show it masked."""
    def echo_key(r):
        return json_answer(429, {"error": {"code": "1113", "message": f"余额不足 for key {key_of(r)}"}})

    up = upstreams(echo_key)
    gw = start_gateway(write_config(config(channel("glm", up.url + "/v1", keys=(K1, K2), extra="preset: glm"))),
                       tmp_path, "--set", "flow_detail=4")
    try:
        for stream in (False, True):
            r = ask(gw, stream=stream)
            assert r.status_code in (429, 503) and K1 not in r.text and K2 not in r.text
        health_text = httpx.get(gw.url + "/health", headers=AUTH, timeout=5).text
        state = json.loads(health_text)["channels"]["glm"]["keys"]
        assert all(k["disabled"] and "429 quota or balance used up" in k["disabled"] for k in state)
        for secret in (K1, K2, PROXY_KEY):
            assert secret not in health_text and secret not in gw.log()
    finally:
        gw.stop()
