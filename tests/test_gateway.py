"""The gateway end to end: a real client -> mitmproxy with the addon -> fake upstreams."""

import json
import time

import httpx
import openai
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk_events, completion, json_answer, sse_answer

CHAT = "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


def client(gw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=PROXY_KEY, max_retries=0)


def post(gw, body, headers=AUTH, path=CHAT, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + path, content=content, headers={"content-type": "application/json", **headers}, timeout=30, **kw)


def error_of(response: httpx.Response) -> dict:
    payload = response.json()
    assert set(payload) == {"error"}
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    return payload["error"]


def test_non_streaming_request_is_mapped_rekeyed_and_otherwise_untouched(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1", extra="model_mapping: {gpt: up-model, mini: up-light}")))
    raw = b'{"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi \\u00e9"}],  "temperature":0.5}'
    response = post(gw, raw, headers={**AUTH, "x-custom": "dropped", "x-session-id": "ses_1", "cookie": "a=b",
                                      "accept-encoding": "gzip"})

    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello from upstream"
    assert response.headers["x-ccx-channel"] == "main"
    assert response.headers["x-ccx-upstream-model"] == "up-light"  # longest key wins: mini
    [received] = up.received
    assert received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEYS[0]}"
    # Only allowlisted client headers go upstream (README, "What goes upstream").
    assert received.headers["x-session-id"] == "ses_1"
    assert "x-custom" not in received.headers and "cookie" not in received.headers
    assert received.headers["accept-encoding"] == "identity"
    assert PROXY_KEY not in json.dumps(received.headers)
    # Only the model value changed, byte for byte.
    assert received.body == raw.replace(b'"gpt-5-mini"', b'"up-light"')


def test_openai_sdk_streaming_and_non_streaming(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")))
    sdk = client(gw)
    reply = sdk.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "hello from upstream"
    assert reply.usage.total_tokens == 18

    stream = sdk.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "hello from upstream"
    assert chunks[-1].usage.completion_tokens == 3


def test_stream_events_arrive_as_they_are_produced(gateway, upstreams):
    events = chunk_events("m", [f"e{i}" for i in range(5)], usage=False)
    up = upstreams(lambda r: sse_answer(events, delay=0.4))
    gw = gateway(config(channel("main", up.url + "/v1")))

    arrivals = []
    start = time.monotonic()
    with httpx.stream("POST", gw.url + CHAT, json={"model": "m", "stream": True, "messages": []}, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - start, line))
    assert len(arrivals) == len(events)
    # The upstream spaces events 0.4 s apart; buffering would deliver them all at the end.
    assert arrivals[0][0] < 1.0
    assert arrivals[-1][0] - arrivals[0][0] > 1.6
    gaps = [b[0] - a[0] for a, b in zip(arrivals, arrivals[1:])]
    assert min(gaps) > 0.2


def test_sse_comment_lines_pass_through(gateway, upstreams):
    events = [b": keep-alive\n\n"] + chunk_events("m", ["x"], usage=False)
    up = upstreams(lambda r: sse_answer(events))
    gw = gateway(config(channel("main", up.url + "/v1")))
    response = post(gw, {"model": "m", "stream": True, "messages": []})
    assert response.text == b"".join(events).decode()


def test_wrong_path_and_method_explain_themselves(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")))

    r = httpx.get(gw.url + CHAT, headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert "use POST" in error_of(r)["message"]

    r = post(gw, {"model": "m"}, path="/v1/chat/completions/chat/completions")
    assert r.status_code == 404
    assert f"Base URL must be http://localhost:{gw.port}/v1, not the concrete" in error_of(r)["message"]

    r = post(gw, {"model": "m"}, path="/chat/completions")
    assert r.status_code == 404 and "must end in /v1" in error_of(r)["message"]

    for path, api in (("/v1/responses", "Responses"), ("/v1/messages", "Messages")):
        r = post(gw, {"model": "m"}, path=path)
        err = error_of(r)
        assert r.status_code == 404 and api in err["message"]
        assert "OpenAI Chat" in err["message"] and "@ai-sdk/openai-compatible" in err["message"]

    r = httpx.get(gw.url + "/whatever", headers=AUTH)
    assert r.status_code == 404 and error_of(r)["code"] == "unknown_url"
    assert up.received == []


def test_proxy_key_is_required_and_checked(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")))
    body = {"model": "m", "messages": []}

    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Bearer {UPSTREAM_KEYS[0]}"}, {"x-api-key": "nope"}):
        r = post(gw, body, headers=headers)
        assert r.status_code == 401
        err = error_of(r)
        assert err["code"] == "invalid_api_key"
        assert "PROXY_ACCESS_KEY" in err["message"] and "not a provider key" in err["message"]
    assert up.received == []

    assert post(gw, body, headers={"x-api-key": PROXY_KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=gw.url + "/v1", api_key="bad", max_retries=0).chat.completions.create(model="m", messages=[])
    assert "proxy access key" in str(raised.value)


@pytest.mark.parametrize("body, code, fragment", [
    (b"{not json", "invalid_json", "not valid JSON"),
    (b"", "invalid_json", "empty"),
    (b"[1, 2]", "invalid_request_body", "JSON object"),
    (b'{"messages": []}', "missing_parameter", "model"),
    (b'{"model": 42}', "invalid_type", "model"),
    (b'{"model": "m", "stream": "yes"}', "invalid_type", "stream"),
])
def test_bad_bodies_get_400(gateway, upstreams, body, code, fragment):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")))
    r = post(gw, body)
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == code and fragment in err["message"]
    assert err["type"] == "invalid_request_error"
    assert up.received == []


def test_oversized_body_gets_413(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")), ccx_max_body_size="1k")
    r = post(gw, {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    assert up.received == []


def test_model_no_channel_allows_is_model_not_found(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(
        channel("a", up.url + "/v1", extra='supported_models: ["deepseek*", "!deepseek-old"]'),
        channel("b", up.url + "/v1", extra="enabled: false"),
    ))
    r = post(gw, {"model": "gpt-9", "messages": []})
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'gpt-9'" in err["message"]
    assert "a: 'gpt-9' does not match supported_models" in err["message"]
    assert "b: disabled" in err["message"]

    r = post(gw, {"model": "deepseek-old", "messages": []})
    assert "excluded by '!deepseek-old'" in error_of(r)["message"]
    with pytest.raises(openai.NotFoundError):
        client(gw).chat.completions.create(model="gpt-9", messages=[])
    assert up.received == []


def test_allowlist_admits_the_mapped_name_too(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("a", up.url + "/v1", extra='model_mapping: {gpt: deepseek-chat}\nsupported_models: ["deepseek*"]')))
    assert post(gw, {"model": "gpt-5", "messages": []}).status_code == 200
    assert up.received[0].json["model"] == "deepseek-chat"


def test_models_and_health(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(
        channel("a", up.url + "/v1", extra='supported_models: ["deepseek-chat", "glm*"]\nmodel_mapping: {gpt-5: deepseek-chat}'),
        channel("spare", up.url + "/v1", extra='enabled: false\nsupported_models: ["hidden"]'),
    ))
    assert httpx.get(gw.url + "/v1/models").status_code == 401
    r = httpx.get(gw.url + "/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["deepseek-chat", "gpt-5"]
    assert r.json()["object"] == "list"
    assert httpx.get(gw.url + "/v1/models/gpt-5", headers=AUTH).json()["owned_by"] == "a"
    assert error_of(httpx.get(gw.url + "/v1/models/nope", headers=AUTH))["code"] == "model_not_found"

    health = httpx.get(gw.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert PROXY_KEY not in health.text and UPSTREAM_KEYS[0] not in health.text
    assert up.received == []


def dead_url() -> str:
    from harness import free_port
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.mark.parametrize("failure", ["refused", "503", "429", "500-html"])
def test_failover_to_the_next_channel(gateway, upstreams, failure):
    behaviours = {
        "503": lambda r: json_answer(503, {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}),
        "429": lambda r: json_answer(429, {"error": {"message": "slow down", "type": "rate_limit", "param": None, "code": None}}),
        "500-html": lambda r: [("send", b"HTTP/1.1 500 Oops\r\ncontent-type: text/html\r\ncontent-length: 13\r\n\r\n<h1>boom</h1>")],
    }
    first_url = dead_url() if failure == "refused" else upstreams(behaviours[failure]).url + "/v1"
    second = upstreams()
    gw = gateway(config(
        channel("first", first_url, keys=(UPSTREAM_KEYS[0],)),
        channel("second", second.url + "/v1", keys=(UPSTREAM_KEYS[1],), extra="model_mapping: {m: second-model}"),
    ))
    for stream in (False, True):
        r = post(gw, {"model": "m", "stream": stream, "messages": []})
        assert r.status_code == 200, r.text
        assert r.headers["x-ccx-channel"] == "second"
    assert [x.json["model"] for x in second.received] == ["second-model", "second-model"]
    assert second.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEYS[1]}"
    flow = gw.flows[-1]
    assert flow.comment.startswith("✓ second ⟵ first") and "failover after first" in flow.comment
    assert flow.marked == ":yellow_circle:"


def test_client_errors_are_passed_through_without_failover(gateway, upstreams):
    bad = upstreams(lambda r: json_answer(400, {"error": {"message": "temperature too high", "type": "invalid_request_error", "param": "temperature", "code": None}}))
    second = upstreams()
    gw = gateway(config(channel("first", bad.url + "/v1"), channel("second", second.url + "/v1")))
    r = post(gw, {"model": "m", "messages": []})
    assert r.status_code == 400
    assert error_of(r)["message"] == "temperature too high"
    assert second.received == []


def test_all_channels_failing_returns_the_last_upstream_error(gateway, upstreams):
    a = upstreams(lambda r: json_answer(500, {"error": {"message": "a broke", "type": "server_error", "param": None, "code": None}}))
    b = upstreams(lambda r: json_answer(503, {"error": {"message": "b overloaded", "type": "server_error", "param": None, "code": None}}, {"retry-after": "7"}))
    gw = gateway(config(channel("a", a.url + "/v1"), channel("b", b.url + "/v1")))
    r = post(gw, {"model": "m", "messages": []})
    assert r.status_code == 503
    assert error_of(r)["message"] == "b overloaded"
    assert r.headers["retry-after"] == "7"
    assert gw.flows[-1].marked == ":red_circle:"


def test_no_upstream_answering_is_502_naming_each_channel(gateway, upstreams):
    gw = gateway(config(channel("one", dead_url()), channel("two", dead_url())))
    r = post(gw, {"model": "m", "messages": []})
    assert r.status_code == 502
    err = error_of(r)
    assert err["code"] == "upstream_unreachable"
    assert "one (one#1): cannot connect" in err["message"] and "two (two#1): cannot connect" in err["message"]


def test_timeout_before_headers_is_504_after_trying_all(gateway, upstreams):
    slow = upstreams(lambda r: [("hang",)])
    # Streaming: response_headers bounds the wait; non-streaming: total bounds the exchange.
    gw = gateway(config(channel("slow", slow.url + "/v1", extra="timeouts: {response_headers: 0.5, total: 1}")))
    started = time.monotonic()
    r = post(gw, {"model": "m", "stream": True, "messages": []})
    assert r.status_code == 504
    assert "no response headers within 0.5s" in error_of(r)["message"]
    assert time.monotonic() - started < 5
    r = post(gw, {"model": "m", "messages": []})
    assert r.status_code == 504
    assert "no response headers within 1s (timeouts.total)" in error_of(r)["message"]


def test_upstream_ignoring_stream_true_is_converted_to_events(gateway, upstreams):
    up = upstreams(lambda r: json_answer(200, completion("m", "converted text")))
    gw = gateway(config(channel("main", up.url + "/v1")))
    stream = client(gw).chat.completions.create(model="m", messages=[], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "converted text"


def test_flow_shows_the_upstream_request_with_keys_masked(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1", extra="model_mapping: {gpt: up-model}")))
    post(gw, {"model": "gpt-5", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    post(gw, {"model": "gpt-5", "messages": []})
    flows = [f for f in gw.flows if f.request.path.endswith("/chat/completions")]
    assert len(flows) == 2
    for flow in flows:
        assert flow.request.url == up.url + "/v1/chat/completions"
        assert json.loads(flow.request.content)["model"] == "up-model"
        assert flow.request.headers["authorization"] == "Bearer [ccx: redacted]"
        assert "x-ccx-handover" not in flow.request.headers
        assert flow.comment.startswith("✓ main | gpt-5→up-model | 200")
        assert flow.metadata["ccx"]["upstream_model"] == "up-model"
    streamed = flows[0]
    assert b"data: [DONE]" in streamed.response.content  # the streamed body is kept
    # At no hook did the flow carry a key.
    dump = json.dumps([str(state) for _, state in gw.collector.updates])
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret not in dump


def test_a_crashing_hook_still_gets_an_openai_shaped_answer(gateway, upstreams):
    from ccx_addon.gateway import ChatGateway

    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")))

    def broken(*args):
        raise RuntimeError("simulated bug")

    gw.addon(ChatGateway).show_upstream_request = broken
    r = post(gw, {"model": "m", "messages": []})
    assert r.status_code == 500
    err = error_of(r)
    assert err["code"] == "gateway_internal_error" and "gateway's log" in err["message"]
    assert r.headers["x-ccx-gateway"] == "local"
