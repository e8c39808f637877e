"""The README's filters, typed into mitmweb's own search box: a real `mitmweb -s` in
headless Chromium (mitmweb 11 filters in the browser, 12 on the server), read back from the
flow list the page shows."""

import re
import socket
import time

import httpx
import pytest

from browser import CHROMIUM, dump_dom, filtered_page, listed_comments
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk, chunk_events, http_head, json_answer, openai_like
from harness import ROOT
from webapi import WEB_PASSWORD, start_mitmweb

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")

CHAT = "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}
SESSION_A = "ses_5b1e0c3a7ffeAbCdEfGh3f2a9c1d"
SSE_HEAD = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})


def overloaded(received):
    return json_answer(503, {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}})


def kimi(received):
    if received.json["messages"] == ["abort"]:
        return [("send", SSE_HEAD + chunk(chunk_events("kimi-k2", ["partial"])[1])), ("hang",)]
    if not received.json.get("stream"):
        return json_answer(400, {"error": {"message": "temperature too high", "type": "invalid_request_error", "param": None, "code": None}})
    return openai_like(received)


# How each request's flow is recognised in the list, by the start of its comment.
ROWS = {
    "failover": "✓ deepseek ⟵ glm 503",
    "attempt": "↯ glm 503 | attempt:",
    "kimi": "✓ kimi |",
    "upstream_error": "✗ failed 400 kimi",
    "no_key": "⊘ 401 rejected",
    "unknown_model": "⊘ 404 rejected",
    "aborted": "✂ aborted by client kimi",
}
EXPECTED = {
    '~comment "key deepseek#"': {"failover"},
    '~comment "deepseek#"': {"failover"},
    "~comment gpt-5": {"failover", "attempt"},
    '~comment "session 3f2a9c1d"': {"failover", "no_key"},
    f"~hq {SESSION_A}": {"failover", "attempt", "no_key"},
    "~comment failed | ~comment rejected": {"upstream_error", "no_key", "unknown_model"},
    "~comment failover": {"failover"},
    "~comment aborted": {"aborted"},
    "~marked": {"failover", "attempt", "upstream_error", "no_key", "unknown_model", "aborted"},
    '!~comment "attempt:"': set(ROWS) - {"attempt"},
}


def send_traffic(gw) -> None:
    def post(body, headers=AUTH, session=None):
        extra = {"x-session-id": session} if session else {}
        return httpx.post(gw.url + CHAT, json=body, headers={**headers, **extra}, timeout=10).status_code

    assert post({"model": "gpt-5", "stream": True, "messages": []}, session=SESSION_A) == 200
    assert post({"model": "kimi-k2", "stream": True, "messages": []}) == 200
    assert post({"model": "kimi-k2", "messages": []}) == 400
    assert post({"model": "gpt-5", "messages": []}, headers={"authorization": "Bearer wrong"}, session=SESSION_A) == 401
    assert post({"model": "llama-9", "messages": []}) == 404
    body = b'{"model": "kimi-k2", "stream": true, "messages": ["abort"]}'
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"POST %b HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %b\r\ncontent-length: %d\r\n\r\n%b"
                     % (CHAT.encode(), PROXY_KEY.encode(), len(body), body))
        received = b""
        while b"partial" not in received:
            received += sock.recv(65536)


@pytest.fixture(scope="module")
def mitmweb_with_traffic(tmp_path_factory):
    from fakeupstream import FakeUpstream

    started = [FakeUpstream(b).start() for b in (overloaded, openai_like, kimi)]
    glm, deepseek, kimi_up = started
    workdir = tmp_path_factory.mktemp("ui")
    path = workdir / "ccx.yaml"
    path.write_text(config(
        channel("glm", glm.url + "/v1", keys=(UPSTREAM_KEYS[0],), extra='supported_models: ["glm-*", "gpt-*"]'),
        channel("deepseek", deepseek.url + "/v1", keys=(UPSTREAM_KEYS[1],),
                extra='model_mapping: {gpt: deepseek-chat}\nsupported_models: ["deepseek-*"]'),
        channel("kimi", kimi_up.url + "/v1", keys=(UPSTREAM_KEYS[2],), extra='supported_models: ["kimi-*"]'),
    ))
    gw, api = start_mitmweb(path, workdir)
    try:
        send_traffic(gw)
        deadline = time.time() + 10
        while not any(f["comment"].startswith(ROWS["aborted"]) for f in api.flows()) and time.time() < deadline:
            time.sleep(0.05)
        yield gw
    finally:
        gw.stop()
        api.client.close()
        for upstream in started:
            upstream.stop()


def shown(gw, expression: str) -> set[str]:
    token = WEB_PASSWORD  # every version asks for it (webauth.py on 11.0)
    comments = listed_comments(dump_dom(filtered_page(gw.web_port, expression, token)))
    names = {name for name, start in ROWS.items() for c in comments if c.startswith(start)}
    local = [c for c in comments if c.startswith("· local")]
    assert len(names) + len(local) == len(comments), comments  # every row is one of ours
    return names


def test_every_readme_filter_works_in_mitmweb(mitmweb_with_traffic):
    gw = mitmweb_with_traffic
    assert shown(gw, "") == set(ROWS)  # everything is listed without a filter
    failures = {}
    for expression, expected in EXPECTED.items():
        if (found := shown(gw, expression)) != expected:
            failures[expression] = found
    assert not failures, failures


def test_the_readme_lists_the_tested_filters():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Finding requests", 1)[1].split("\n#", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    documented = re.findall(r"`(!?~[^`]+)`", "\n".join(table).replace("\\|", "|"))
    assert set(documented) == set(EXPECTED), documented
