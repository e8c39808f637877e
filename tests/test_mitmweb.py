"""A real `mitmweb -s ccx_addon/addon.py`, read through mitmweb's own REST API as its
browser app does: the flow list has the gateway's comments and markers, the comment column
is on, streamed bodies are readable, the `ccx.explain` command answers, and no proxy or
upstream key appears anywhere mitmweb can show."""

import json
import re
import time

import httpx
import openai
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import json_answer
from webapi import WebApi, start_mitmweb

SECRETS = (PROXY_KEY, *UPSTREAM_KEYS)


def leaky(received):
    """An upstream that quotes the key it was sent in its error, as some do."""
    return json_answer(503, {"error": {"message": f"bad key {received.headers['authorization']}", "type": "x", "param": None, "code": None}})


@pytest.fixture
def mitmweb(upstreams, write_config, tmp_path):
    leaky_up, good = upstreams(leaky), upstreams()
    cfg = write_config(config(
        channel("leaky", leaky_up.url + "/v1", keys=(UPSTREAM_KEYS[0],)),
        channel("good", good.url + "/v1", keys=(UPSTREAM_KEYS[1], UPSTREAM_KEYS[2]), extra="model_mapping: {gpt: good-model}"),
    ))
    gw, api = start_mitmweb(cfg, tmp_path)
    try:
        yield gw, api
    finally:
        gw.stop()
        api.close()


def test_mitmweb_shows_the_flow_log_without_any_key(mitmweb):
    gw, api = mitmweb
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=PROXY_KEY, max_retries=0)
    reply = sdk.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "hello from upstream"
    stream = sdk.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}], stream=True,
                                         extra_headers={"x-session-id": "ses_0123456789abWEBSESSION"})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "hello from upstream"
    # A provider key used as the gateway key: refused, and not shown either.
    assert httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-5"},
                      headers={"x-api-key": UPSTREAM_KEYS[1]}, timeout=10).status_code == 401

    api.wait_for_flows(lambda f: "ttf" in f["comment"], 2)  # a stream's response hook may run after its client is done
    listed = [f for f in api.get("/flows").json() if f["request"]["path"].endswith("/chat/completions")]
    attempts = [f for f in listed if "| attempt: #" in f["comment"]]  # leaky's 503s, as flows of their own
    flows = [f for f in listed if f not in attempts]
    assert len(flows) == 3 and len(attempts) == 2
    served, streamed, rejected = sorted(flows, key=lambda f: f["timestamp_created"])
    for flow in (served, streamed):
        assert flow["comment"].startswith("✓ good ⟵ leaky 503 | gpt-5→good-model | 200")
        assert "| failover after leaky (leaky#1): 503 " in flow["comment"] and "| key good#" in flow["comment"]
        assert flow["marked"] == "🟡"  # mitmweb sends the marker as an emoji
        assert flow["request"]["pretty_host"] == "127.0.0.1"
        headers = dict(flow["request"]["headers"])
        assert headers["x-ccx-requested-model"] == "gpt-5"
    assert "| 200 stream | ttft " in streamed["comment"] and re.search(r"\| session BSESSION → good#\d \(new\) \| attempt flows ", streamed["comment"])
    assert rejected["comment"] == "⊘ 401 rejected: invalid_api_key" and rejected["marked"] == "🟠"

    # The streamed answer is readable in the response tab, the mapped model in the request tab.
    body = api.get(f"/flows/{streamed['id']}/response/content.data").text
    assert "hello" in body and "data: [DONE]" in body
    assert json.loads(api.get(f"/flows/{streamed['id']}/request/content.data").text)["model"] == "good-model"

    # The comment column is on; the flow limit is in force.
    options = api.get("/options").json()
    assert "comment" in options["web_columns"]["value"]
    assert options["ccx_keep_flows"]["value"] == 1000

    # Nowhere: flow list, bodies, the event log, the full dump of every flow.
    shown = [api.get("/flows").content, api.get("/events").content, api.get("/flows/dump").content]
    for flow in listed:
        for message in ("request", "response"):
            shown.append(api.get(f"/flows/{flow['id']}/{message}/content.data").content)
    assert b"leaky (leaky#1): 503" in shown[0]  # the leaky upstream's error was seen
    for secret in SECRETS:
        for text in shown:
            assert secret.encode() not in text, secret
    log = gw.log()
    assert "ccx-addon: loaded" in log
    for secret in SECRETS:
        assert secret not in log


def test_ccx_explain_command_in_mitmweb(mitmweb):
    gw, api = mitmweb
    response = api.client.post("/commands/ccx.explain", json={"arguments": ["gpt-5"]})
    assert response.status_code == 200, response.text
    text = response.json()["value"]
    assert "allowed #1 leaky" in text and "allowed #2 good " in text
    assert "gpt-5 → good-model (model_mapping rule 'gpt')" in text
    assert "http://127.0.0.1:" in text
    for secret in SECRETS:
        assert secret not in text


def test_mitmweb_api_refuses_requests_without_the_token(mitmweb):
    """On mitmproxy 11.0 (no web authentication of its own) the addon's check; on 12,
    mitmweb's: either way nothing is readable or runnable without the token."""
    gw, api = mitmweb
    httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-5", "messages": []},
               headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
    assert api.get("/flows").json()  # with the token: the flow is there
    for token in (None, "wrong-token"):
        anonymous = WebApi(int(api.base_url.rsplit(":", 1)[1]), token=token)
        try:
            for path in ("/", "/flows", "/flows/dump", "/events", "/options", "/updates"):
                assert anonymous.client.get(path).status_code in (401, 403), path
            # The attack of issue 9: write every flow to a file of the caller's choosing.
            saved = anonymous.client.post("/commands/save.file", json={"arguments": ["@all", "/tmp/ccx-stolen"]})
            assert saved.status_code in (401, 403)
        finally:
            anonymous.close()
    # The browser way: ?token= once, then a cookie.
    browser = httpx.Client(base_url=api.base_url, timeout=10)
    try:
        assert browser.get("/", params={"token": "web-ui-password-for-tests"}).status_code == 200
        assert browser.get("/flows").status_code == 200
    finally:
        browser.close()
