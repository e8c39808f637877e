"""The flow list as the request log (issue 4): from the flow list alone a user can tell what
happened to each request, find requests by channel, model, session and failure with
filters that work on both mitmproxy versions, see the client's original request, read a
summary line per request in mitmdump's output, and keep mitmweb's memory bounded."""

import json
import re

import httpx
import pytest
from mitmproxy import flowfilter, hooks
from mitmproxy.addons.view import View
from mitmproxy.test import taddons, tflow

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import FakeUpstream, chunk, chunk_events, http_head, json_answer
from gateway_process import start_gateway
from harness import ROOT, InProcessGateway

from ccx_addon.flowlist import CommentColumn, FlowLimit, columns_with_comment, flows_to_drop
from ccx_addon.flowsummary import TimedStreamCapture, is_token_event, scan_for_first_token, session_label

CHAT = "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
# OpenCode's ids: "ses_" + a time-ordered part + a random part.
SESSION_A = "ses_5b1e0c3a7ffeAbCdEfGh3f2a9c1d"
SESSION_B = "ses_5b1e0c3a7ffeZyXwVuTs22222222"
FIRST_TOKEN_DELAY = 0.4


def post(gw, body, headers=AUTH, session=None):
    headers = {**headers, **({"x-session-id": session} if session else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + CHAT, content=content, headers={"content-type": "application/json", **headers}, timeout=30)


def slow_first_token(received):
    """A stream whose role event comes at once and whose first token comes later: time to
    first byte and time to first token differ."""
    events = chunk_events(received.json["model"], ["hello", " world", "!"])
    head = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
    steps = [("send", head + chunk(events[0])), ("sleep", FIRST_TOKEN_DELAY)]
    steps += [("send", chunk(e)) for e in events[1:]]
    return steps + [("send", b"0\r\n\r\n")]


def overloaded(received):
    return json_answer(503, {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}})


def picky(received):
    if received.json.get("stream"):
        return slow_first_token(received)
    return json_answer(400, {"error": {"message": "temperature too high", "type": "invalid_request_error", "param": None, "code": None}})


def three_channels(glm, deepseek, kimi) -> str:
    return config(
        channel("glm", glm.url + "/v1", keys=(UPSTREAM_KEYS[0],), extra='supported_models: ["glm-*", "gpt-*"]'),
        channel("deepseek", deepseek.url + "/v1", keys=(UPSTREAM_KEYS[1],),
                extra='model_mapping: {gpt: deepseek-chat}\nsupported_models: ["deepseek-*"]'),
        channel("kimi", kimi.url + "/v1", keys=(UPSTREAM_KEYS[2],), extra='supported_models: ["kimi-*"]'),
    )


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """One gateway, one request of each kind, shared by the tests that read the flows;
    returns (gateway, {name: flow})."""
    started = [FakeUpstream(b).start() for b in (overloaded, slow_first_token, picky)]
    path = tmp_path_factory.mktemp("traffic") / "ccx.yaml"
    path.write_text(three_channels(*started))
    gw = InProcessGateway(path).start()
    try:
        yield gw, send_one_of_each(gw)
    finally:
        gw.stop()
        for upstream in started:
            upstream.stop()


FLOW_NAMES = ("failover", "kimi", "upstream_error", "no_key", "unknown_model", "bad_json")


def send_one_of_each(gw) -> dict:
    sent = {
        "failover": post(gw, {"model": "gpt-5", "stream": True, "messages": []}, session=SESSION_A),
        "kimi": post(gw, {"model": "kimi-k2", "stream": True, "messages": []}, session=SESSION_B),
        "upstream_error": post(gw, {"model": "kimi-k2", "messages": []}, session=SESSION_B),
        "no_key": post(gw, {"model": "gpt-5", "messages": []}, headers={"authorization": "Bearer wrong"}, session=SESSION_A),
        "unknown_model": post(gw, {"model": "llama-9", "messages": []}),
        "bad_json": post(gw, b"{not json"),
    }
    expected = {"failover": 200, "kimi": 200, "upstream_error": 400, "no_key": 401, "unknown_model": 404, "bad_json": 400}
    assert {name: r.status_code for name, r in sent.items()} == expected
    flows = [f for f in gw.flows if f.comment and not f.comment.startswith("· local")]
    assert len(flows) == len(sent)
    # The flows finish in the order the requests were sent, one at a time.
    return dict(zip(sent, flows))


def matching(expression: str, flows: dict) -> set[str]:
    return {name for name, flow in flows.items() if flowfilter.match(expression, flow)}


def test_comment_tells_channel_models_attempts_status_timing_tokens_session(traffic):
    _, flows = traffic
    failover = flows["failover"].comment
    # The verdict first (mitmweb's comment column is 150 px wide), the details in a fixed order.
    assert failover.startswith("✓ deepseek ⟵ glm 503 | gpt-5→deepseek-chat | 200 stream | ttft ")
    assert failover.endswith(
        " | tokens in 11 out 3 | failover after glm (glm#1): 503 overloaded | key deepseek#1 | session 3f2a9c1d"
    )
    # A first-try success says nothing about attempts.
    kimi = flows["kimi"].comment
    assert kimi.startswith("✓ kimi | kimi-k2→kimi-k2 | 200 stream | ttft ") and "attempt" not in kimi
    assert kimi.endswith(" | tokens in 11 out 3 | key kimi#1 | session 22222222")
    assert flows["upstream_error"].comment.startswith("✗ failed 400 kimi | kimi-k2→kimi-k2 | 400 | ttfb ")
    assert flows["no_key"].comment == "⊘ 401 rejected: invalid_api_key | session 3f2a9c1d"
    assert flows["unknown_model"].comment == "⊘ 404 rejected: model_not_found | llama-9"
    assert flows["bad_json"].comment == "⊘ 400 rejected: invalid_json"


def test_markers_tell_failover_rejection_and_upstream_error_apart(traffic):
    _, flows = traffic
    assert {name: f.marked for name, f in flows.items()} == {
        "failover": ":yellow_circle:", "kimi": "", "upstream_error": ":red_circle:",
        "no_key": ":orange_circle:", "unknown_model": ":orange_circle:", "bad_json": ":orange_circle:",
    }


def test_time_to_first_token_is_measured_from_the_first_generated_token(traffic):
    _, flows = traffic
    meta = flows["failover"].metadata["ccx"]
    # The role event arrives at once, the first token FIRST_TOKEN_DELAY later.
    assert meta["ttfb_ms"] < FIRST_TOKEN_DELAY * 1000 - 100
    assert FIRST_TOKEN_DELAY * 1000 <= meta["ttft_ms"] <= meta["duration_ms"]
    assert f"ttft {meta['ttft_ms']}ms" in flows["failover"].comment
    assert meta["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


FILTERS = {
    # a channel: the one that answered, or every request that reached it
    '~comment "key deepseek#"': {"failover"},
    '~comment "key kimi#"': {"kimi", "upstream_error"},
    '~comment "deepseek#"': {"failover"},
    '~comment "glm#"': {"failover"},
    # a model: requested or sent upstream
    "~comment gpt-5": {"failover"},
    '~comment "→deepseek-chat "': {"failover"},
    "~comment kimi-k2": {"kimi", "upstream_error"},
    "~comment llama-9": {"unknown_model"},
    # a client session
    '~comment "session 3f2a9c1d"': {"failover", "no_key"},
    '~comment "session 22222222"': {"kimi", "upstream_error"},
    f"~hq {SESSION_A}": {"failover", "no_key"},
    # failures, failovers, everything with a marker
    "~comment failed | ~comment rejected": {"upstream_error", "no_key", "unknown_model", "bad_json"},
    "~comment failover": {"failover"},
    "~marked": {"failover", "upstream_error", "no_key", "unknown_model", "bad_json"},
    "~comment aborted": set(),
    "!~comment aborted": set(FLOW_NAMES),
    '!~comment "attempt:"': set(FLOW_NAMES),  # in-process there is no flow list, so no attempt flows
}


@pytest.mark.parametrize("expression", FILTERS)
def test_documented_filters_find_the_right_flows(traffic, expression):
    _, flows = traffic
    assert matching(expression, flows) == FILTERS[expression]


def test_filters_in_the_readme_are_the_tested_ones():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Finding requests", 1)[1].split("\n#", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    documented = re.findall(r"`(!?~[^`]+)`", table.replace("\\|", "|"))
    assert len(documented) == 10 and set(documented) <= set(FILTERS), documented


def test_the_clients_request_stays_next_to_the_upstream_one(traffic):
    _, flows = traffic
    flow = flows["failover"]
    # The flow shows what went upstream ...
    assert json.loads(flow.request.content)["model"] == "deepseek-chat"
    assert flow.request.path == "/v1/chat/completions" and flow.request.port != 0
    # ... and, visible in mitmweb's request view, what the client asked for.
    assert flow.request.headers["x-ccx-requested-model"] == "gpt-5"
    client = flow.metadata["ccx"]["client_request"]
    assert client["method"] == "POST" and client["path"] == CHAT
    assert client["model"] == "gpt-5" and client["stream"] is True
    assert client["headers"]["authorization"] == "Bearer [ccx: redacted]"
    assert client["headers"]["x-session-id"] == SESSION_A
    assert flow.metadata["ccx"]["session"] == "3f2a9c1d"
    dump = json.dumps([f.get_state() for f in flows.values()], default=repr)
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret not in dump


def test_mitmdump_prints_a_summary_line_per_request(upstreams, write_config, tmp_path):
    glm, deepseek, kimi = upstreams(overloaded), upstreams(slow_first_token), upstreams(picky)
    gw = start_gateway(write_config(three_channels(glm, deepseek, kimi)), tmp_path)
    try:
        assert post(gw, {"model": "gpt-5", "stream": True, "messages": []}, session=SESSION_A).status_code == 200
        assert post(gw, {"model": "kimi-k2", "messages": []}).status_code == 400
        assert post(gw, {"model": "gpt-5"}, headers={"authorization": f"Bearer {UPSTREAM_KEYS[0]}"}).status_code == 401
    finally:
        gw.stop()
    log = gw.log()
    lines = [line.split("] ", 1)[-1] for line in log.splitlines() if f" {CHAT} " in line]
    assert len(lines) == 3, log
    served, failed, rejected = lines
    # The same words as the comment.
    assert served.startswith(f"POST {CHAT} ✓ deepseek ⟵ glm 503 | gpt-5→deepseek-chat | 200 stream | ttft ")
    assert "| tokens in 11 out 3 | failover after glm (glm#1): 503 overloaded | key deepseek#1 | session 3f2a9c1d" in served
    assert failed.startswith(f"POST {CHAT} ✗ failed 400 kimi | kimi-k2→kimi-k2 | 400 | ttfb ")
    assert rejected == f"POST {CHAT} ⊘ 401 rejected: invalid_api_key"
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret not in log


# --- mitmweb's flow list, in-process ------------------------------------------------------------


def test_keep_flows_removes_the_oldest_finished_flows_from_the_view(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1")), ccx_keep_flows=3)
    view = View()
    gw.call(gw.master.addons.add, view)
    for i in range(5):
        assert post(gw, {"model": f"m{i}", "messages": []}).status_code == 200
    kept = gw.call(view.resolve, "@all")
    assert [f.metadata["ccx"]["requested_model"] for f in kept] == ["m2", "m3", "m4"]
    assert gw.call(view.store_count) == 3 == len(view)

    gw.call(lambda: gw.master.options.update(ccx_keep_flows=1))
    assert [f.metadata["ccx"]["requested_model"] for f in gw.call(view.resolve, "@all")] == ["m4"]
    gw.call(lambda: gw.master.options.update(ccx_keep_flows=0))  # 0 keeps everything
    for i in range(5, 8):
        post(gw, {"model": f"m{i}", "messages": []})
    assert gw.call(view.store_count) == 4


def test_keep_flows_never_drops_a_flow_in_flight():
    done = [tflow.tflow(resp=True) for _ in range(3)]
    for f in done:
        f.live = False
    live = tflow.tflow()
    live.live = True
    assert flows_to_drop([live, *done], keep=2) == done[:2]
    assert flows_to_drop(done, keep=3) == []
    assert flows_to_drop(done, keep=0) == []


def test_keep_flows_rejects_negative_numbers():
    from mitmproxy import exceptions

    with taddons.context(FlowLimit()) as tctx:
        with pytest.raises(exceptions.OptionsError, match="ccx_keep_flows"):
            tctx.configure(tctx.master.addons.get("flowlimit"), ccx_keep_flows=-1)


def test_comment_column_is_switched_on_unless_the_user_chose_columns():
    from mitmproxy.tools.web.webaddons import WebAddon

    assert columns_with_comment(["path", "status"]) == ["path", "status", "comment"]
    assert columns_with_comment(["comment", "path"]) is None

    with taddons.context(WebAddon()) as tctx:
        default = list(tctx.options.web_columns)
        column = CommentColumn()
        tctx.master.addons.add(column)
        # What mitmproxy's script loader does for a freshly loaded script.
        tctx.master.addons.invoke_addon_sync(column, hooks.ConfigureHook(set(tctx.options.keys())))
        assert list(tctx.options.web_columns) == [*default, "comment"]

    with taddons.context(WebAddon()) as tctx:
        tctx.options.update(web_columns=["path", "status"])  # --set web_columns=path,status
        column = CommentColumn()
        tctx.master.addons.add(column)
        tctx.master.addons.invoke_addon_sync(column, hooks.ConfigureHook(set(tctx.options.keys())))
        assert list(tctx.options.web_columns) == ["path", "status"]

    with taddons.context() as tctx:  # mitmdump: no web_columns option, nothing to do
        column = CommentColumn()
        tctx.master.addons.add(column)
        tctx.master.addons.invoke_addon_sync(column, hooks.ConfigureHook(set(tctx.options.keys())))
        assert "web_columns" not in tctx.options


# --- pure parts --------------------------------------------------------------------------------


def test_session_label_is_the_random_end_of_the_session_id():
    from mitmproxy import http

    assert session_label(http.Headers(x_session_id=SESSION_A)) == "3f2a9c1d"
    assert session_label(http.Headers(x_session_affinity=SESSION_B)) == "22222222"
    assert session_label(http.Headers()) == ""


def test_first_token_is_found_across_split_events():
    events = chunk_events("m", ["", "tok"], usage=False)  # role, an empty delta, then a token
    stream = b"".join(events)
    assert not is_token_event(json.loads(events[0][6:]))
    assert is_token_event({"choices": [{"delta": {"tool_calls": [{"index": 0}]}}]})
    assert is_token_event({"choices": [{"delta": {"reasoning_content": "hm"}}]})

    capture = TimedStreamCapture(limit=1 << 20)
    cut = stream.index(b"tok") + 1  # inside the token event
    for piece in (stream[:10], stream[10:cut]):
        assert capture(piece) == piece  # passed on unchanged
    assert capture.first_token_at is None
    capture(stream[cut:])
    assert capture.first_token_at is not None
    assert bytes(capture.kept) == stream

    found, position = scan_for_first_token(stream, 0)
    assert found and position == stream.index(b"\n", stream.index(b"tok")) + 1
    assert scan_for_first_token(b"".join(events[:2]), 0)[0] is False
