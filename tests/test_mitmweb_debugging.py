"""mitmweb as the debugging tool (issue 10), through mitmweb's own REST API on a real
`mitmweb -s ccx_addon/addon.py`: failed attempts as flows of their own, local answers with
the URL the client called, client aborts that keep their partial body, the chat content
view for JSON and SSE answers."""

import json
import socket

import httpx
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk, http_head, json_answer, openai_like, sse_answer
from webapi import start_mitmweb

CHAT = "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
SECRETS = (PROXY_KEY, *UPSTREAM_KEYS)
SSE_HEAD = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
OVERLOADED = {"error": {"message": "flaky upstream is overloaded right now", "type": "server_error", "param": None, "code": "overloaded"}}


def ev(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(**fields) -> bytes:
    return ev({"id": "c1", "object": "chat.completion.chunk", "model": "up-model",
               "choices": [{"index": 0, "delta": fields, "finish_reason": None}]})


TOOL_EVENTS = [
    delta(role="assistant", content=""),
    delta(reasoning_content="The user wants "),
    delta(reasoning_content="a file."),
    delta(content="Reading it"),
    delta(content=" now."),
    delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": ""}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": '{"path": "src/'}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": 'main.py"}'}}]),
    ev({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ev({"id": "c1", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}}),
    b"data: [DONE]\n\n",
]
TOOL_COMPLETION = {
    "id": "c2", "object": "chat.completion", "model": "up-model",
    "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me look.", "reasoning_content": "Need the file first.",
        "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "grep", "arguments": '{"pattern": "TODO"}'}}],
    }}],
    "usage": {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39},
}


def scripted(received):
    """The last user message picks the answer."""
    messages = received.json.get("messages") or [{}]
    scenario = messages[-1].get("content", "")
    if scenario == "abort":  # two events, then nothing until the client gives up
        return [("send", SSE_HEAD + chunk(TOOL_EVENTS[0]) + chunk(TOOL_EVENTS[3])), ("hang",)]
    if scenario == "tools-sse":
        return sse_answer(TOOL_EVENTS)
    if scenario == "tools-json":
        return json_answer(200, TOOL_COMPLETION)
    return openai_like(received)


def overloaded(received):
    return json_answer(503, OVERLOADED, {"x-request-id": "flaky-req-1"})


@pytest.fixture
def web(upstreams, write_config, tmp_path):
    flaky, main = upstreams(overloaded), upstreams(scripted)
    cfg = write_config(config(
        channel("flaky", flaky.url + "/v1", keys=(UPSTREAM_KEYS[0],), extra='supported_models: ["fo-*"]'),
        channel("main", main.url + "/v1", keys=(UPSTREAM_KEYS[1],), extra="model_mapping: {gpt: up-model}"),
    ))
    gw, api = start_mitmweb(cfg, tmp_path)
    try:
        yield gw, api, flaky, main
    finally:
        gw.stop()
        api.client.close()


def chat(gw, scenario: str = "hi", model: str = "gpt-5", stream: bool = False) -> httpx.Response:
    body = {"model": model, "stream": stream, "messages": [
        {"role": "system", "content": "You are a coding agent."},
        {"role": "user", "content": scenario},
    ], "tools": [{"type": "function", "function": {"name": "read_file", "description": "Read a file.",
                                                    "parameters": {"type": "object", "required": ["path"],
                                                                   "properties": {"path": {"type": "string"}}}}}]}
    return httpx.post(gw.url + CHAT, json=body, headers=AUTH, timeout=10)


def view_text(api, flow_id: str, message: str, view: str) -> tuple[str, str]:
    """(description, text) of a content view, from mitmweb 11's styled lines or 12's text."""
    data = api.get(f"/flows/{flow_id}/{message}/content/{view}.json").json()
    if "lines" in data:
        text = "\n".join("".join(part[1] for part in line) for line in data["lines"])
    else:
        text = data["text"]
    return data.get("description", "") or data.get("view_name", ""), text


def finished_chat(f: dict) -> bool:
    """A chat flow whose response hook has run (a stream's client may see its end first):
    only then does the comment carry the timing."""
    return f["request"]["path"] == CHAT and "ttf" in f["comment"]


def only_flow(api, predicate) -> dict:
    [flow] = api.wait_for_flows(predicate, 1)
    return flow


def test_content_view_renders_json_and_sse_answers(web):
    gw, api, _, _ = web
    assert chat(gw, "tools-sse", stream=True).status_code == 200
    assert chat(gw, "tools-json").status_code == 200
    flows = api.wait_for_flows(finished_chat, 2)
    streamed, buffered = sorted(flows, key=lambda f: f["timestamp_created"])

    _, text = view_text(api, streamed["id"], "response", "chat")
    assert "── reasoning ──\nThe user wants a file." in text
    assert "── text ──\nReading it now." in text
    assert '#0 read_file (call_1)\n  {"path": "src/main.py"}' in text  # arguments reassembled
    assert "finish_reason: tool_calls" in text and "usage: in 40 out 12 total 52" in text

    _, text = view_text(api, buffered["id"], "response", "chat")
    assert "── text ──\nLet me look." in text and "── reasoning ──\nNeed the file first." in text
    assert '#0 grep (call_9)\n  {"pattern": "TODO"}' in text and "finish_reason: tool_calls" in text

    # The request: the conversation turn by turn, then the tools.
    _, text = view_text(api, buffered["id"], "request", "chat")
    assert "── system ──\nYou are a coding agent.\n── user ──\ntools-json" in text
    assert "── tools (1) ──\nread_file(path: string*) — Read a file." in text

    # Chosen automatically for chat flows; the raw view is still there.
    for flow in (streamed, buffered):
        _, auto = view_text(api, flow["id"], "response", "auto")
        assert "finish_reason: tool_calls" in auto
    _, raw = view_text(api, streamed["id"], "response", "raw")
    assert "data: [DONE]" in raw and "chat.completion.chunk" in raw


def test_local_answers_show_the_url_the_client_called(web):
    gw, api, _, _ = web
    port = gw.port
    assert httpx.post(gw.url + CHAT, json={"model": "m"}, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.post(gw.url + "/v1/responses", json={}, headers=AUTH, timeout=10).status_code == 404
    assert httpx.get(gw.url + CHAT, headers=AUTH, timeout=10).status_code == 405
    assert httpx.post(gw.url + CHAT, content=b"{nope", headers=AUTH, timeout=10).status_code == 400
    assert httpx.get(gw.url + "/v1/models", headers=AUTH, timeout=10).status_code == 200
    flows = api.wait_for_flows(lambda f: True, 6)  # wait_healthy's /health is there too
    urls = {(f["request"]["method"], f["request"]["path"]): f["request"] for f in flows}
    for method, path in [("POST", CHAT), ("POST", "/v1/responses"), ("GET", CHAT), ("GET", "/v1/models"), ("GET", "/health")]:
        request = urls[(method, path)]
        assert (request["scheme"], request["host"], request["port"]) == ("http", "127.0.0.1", port), (method, path)
        assert request["pretty_host"] == "127.0.0.1"
    assert not any(f["request"]["port"] == 9 for f in flows)
    # The chat view is not chosen for what is not a completion.
    models = next(f for f in flows if f["request"]["path"] == "/v1/models")
    _, text = view_text(api, models["id"], "response", "auto")
    assert '"list"' in text
    assert "finish_reason" not in text


def test_client_abort_keeps_its_partial_body_and_content_endpoint_answers(web):
    gw, api, _, main = web
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    body = json.dumps({"model": "gpt-5", "stream": True, "messages": [{"role": "user", "content": "abort"}]}).encode()
    sock.sendall(b"POST %b HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %b\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%b" % (CHAT.encode(), PROXY_KEY.encode(), len(body), body))
    received = b""
    while b"Reading it" not in received:
        received += sock.recv(65536)
    sock.close()
    flow = only_flow(api, lambda f: f["request"]["path"] == CHAT and f["comment"].startswith("✂"))
    assert flow["comment"].startswith("✂ aborted by client main | gpt-5→up-model | 200 stream (partial) | ttft ")
    assert flow["comment"].count("client") == 1
    assert flow["marked"] == "🔵"
    content = api.client.get(f"/flows/{flow['id']}/response/content.data")
    assert content.status_code == 200, content.text[:300]
    assert b"Reading it" in content.content and b"[DONE]" not in content.content
    _, text = view_text(api, flow["id"], "response", "chat")
    assert "Reading it" in text and "no [DONE]" in text
    assert "Traceback" not in gw.log()


def test_failover_shows_the_failed_attempt_as_a_flow_of_its_own(web):
    gw, api, flaky, main = web
    reply = chat(gw, model="fo-1")
    assert reply.status_code == 200 and reply.headers["x-ccx-channel"] == "main"
    flows = api.wait_for_flows(lambda f: finished_chat(f) or "| attempt: #" in f["comment"], 2)
    [served] = [f for f in flows if "attempt_of" not in json.dumps(f.get("metadata", {})) and f["comment"].startswith("✓")]
    [attempt] = [f for f in flows if f["comment"].startswith("↯ ") and "| attempt: #" in f["comment"]]

    # The attempt: marked, the upstream's URL, real status, headers and error body, timing.
    assert attempt["comment"].startswith(f"↯ flaky 503 | attempt: #1 for {served['id'][:8]} | fo-1→fo-1 | 503 ")
    assert attempt["marked"] == "🟣"
    assert attempt["request"]["host"] == "127.0.0.1" and attempt["request"]["port"] == flaky.port
    assert attempt["request"]["path"] == CHAT
    assert ["authorization", "Bearer [ccx: redacted]"] in [[k.lower(), v] for k, v in attempt["request"]["headers"]]
    assert attempt["response"]["status_code"] == 503
    assert ["x-request-id", "flaky-req-1"] in [[k.lower(), v] for k, v in attempt["response"]["headers"]]
    assert attempt["response"]["timestamp_end"] >= attempt["request"]["timestamp_start"]
    body = api.get(f"/flows/{attempt['id']}/response/content.data").json()
    assert body == OVERLOADED
    assert json.loads(api.get(f"/flows/{attempt['id']}/request/content.data").content)["model"] == "fo-1"

    # The served flow links back; both are found by the served flow's id.
    assert served["comment"].startswith("✓ main ⟵ flaky 503 | fo-1→fo-1 | 200 |")
    assert served["comment"].endswith(f"| attempt flows {attempt['id'][:8]}")
    assert served["marked"] == "🟡"
    # Nothing secret anywhere: the real key went to the upstream only.
    assert flaky.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEYS[0]}"
    dump = api.get("/flows/dump").content
    for secret in SECRETS:
        assert secret.encode() not in dump


def test_attempt_flows_are_bounded_like_the_rest(upstreams, write_config, tmp_path):
    flaky, main = upstreams(overloaded), upstreams(scripted)
    cfg = write_config(config(
        channel("flaky", flaky.url + "/v1", keys=(UPSTREAM_KEYS[0],), extra='supported_models: ["fo-*"]'),
        channel("main", main.url + "/v1", keys=(UPSTREAM_KEYS[1],)),
    ))
    gw, api = start_mitmweb(cfg, tmp_path, "--set", "ccx_keep_flows=4")
    try:
        for _ in range(5):
            assert chat(gw, model="fo-1").status_code == 200
        flows = api.flows()
        assert len(flows) == 4
        # The newest are kept: the last request and its attempt flow among them.
        assert any(f["comment"].startswith("↯ ") and "| attempt: #" in f["comment"] for f in flows)
    finally:
        gw.stop()
        api.client.close()


def replay(api, flow_id: str) -> dict:
    response = api.post(f"/flows/{flow_id}/replay")
    assert response.status_code == 200, response.text
    return only_flow(api, lambda f: f["id"] == flow_id and f["comment"].startswith("↻") and f["response"])


@pytest.mark.parametrize("stream", [False, True])
def test_replay_sends_the_flow_again_with_the_real_key(web, stream):
    gw, api, _, main = web
    assert chat(gw, "hi", stream=stream).status_code == 200
    original = only_flow(api, finished_chat)
    assert len(main.received) == 1

    replayed = replay(api, original["id"])
    assert len(main.received) == 2
    again = main.received[1]
    # The upstream got the channel's real key and the request the flow shows.
    assert again.headers["authorization"] == f"Bearer {UPSTREAM_KEYS[1]}"
    assert again.json == main.received[0].json
    assert replayed["response"]["status_code"] == 200
    assert replayed["comment"].startswith(f"↻✓ main | replay of {original['id'][:8]} | up-model→up-model | 200")
    assert ["authorization", "Bearer [ccx: redacted]"] in [[k.lower(), v] for k, v in replayed["request"]["headers"]]
    assert replayed["request"]["port"] == main.port
    assert "hello" in api.get(f"/flows/{original['id']}/response/content.data").text
    dump = api.get("/flows/dump").content
    for secret in SECRETS:
        assert secret.encode() not in dump


def test_edit_and_replay_changes_what_the_upstream_receives(web):
    gw, api, _, main = web
    assert chat(gw, "hi").status_code == 200
    original = only_flow(api, finished_chat)
    # Duplicate, edit the copy's body, replay the copy (mitmweb's Edit → Replay).
    assert api.post(f"/flows/{original['id']}/duplicate").status_code == 200
    [copy] = [f for f in api.flows() if f["id"] != original["id"] and f["request"]["path"] == CHAT]
    edited = json.loads(api.get(f"/flows/{copy['id']}/request/content.data").content)
    edited["messages"][-1]["content"] = "edited in mitmweb"
    edited["temperature"] = 0.1
    response = api.client.put(f"/flows/{copy['id']}", json={"request": {"content": json.dumps(edited)}})
    assert response.status_code == 200, response.text
    replayed = replay(api, copy["id"])
    sent = main.received[-1]
    assert sent.json["messages"][-1]["content"] == "edited in mitmweb" and sent.json["temperature"] == 0.1
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEYS[1]}"
    assert replayed["comment"].startswith(f"↻✓ main | replay of {original['id'][:8]} |")


def test_replay_of_a_flow_whose_channel_is_gone_gets_a_clear_error(web, write_config, tmp_path):
    gw, api, flaky, main = web
    assert chat(gw, "hi").status_code == 200
    original = only_flow(api, finished_chat)
    # The config loses the channel (the gateway reloads its file when it changes).
    gw.config_path.write_text(config(channel("flaky", flaky.url + "/v1", keys=(UPSTREAM_KEYS[0],))))
    assert api.post("/commands/ccx.reload").status_code == 200
    replayed = replay(api, original["id"])
    assert replayed["response"]["status_code"] == 410
    error = api.get(f"/flows/{original['id']}/response/content.data").json()["error"]
    assert error["code"] == "replay_target_gone" and "channel 'main'" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert len(main.received) == 1 and len(flaky.received) == 0

    # A flow the gateway refused itself: said so, nothing sent.
    assert httpx.post(gw.url + CHAT, json={"model": "m"}, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
    refused = only_flow(api, lambda f: f["comment"].startswith("⊘ 401"))
    replayed = replay(api, refused["id"])
    assert replayed["response"]["status_code"] == 409 and replayed["comment"].startswith("↻⊘ 409 rejected: replay_not_possible")
    error = api.get(f"/flows/{refused['id']}/response/content.data").json()["error"]
    assert "Only flows an upstream answered can be replayed" in error["message"]
    assert len(main.received) == 1 and len(flaky.received) == 0
