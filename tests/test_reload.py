"""Hot reload: the watched config file and the `ccx.reload` command, with requests in flight."""

import logging
import threading
import os
import time

import httpx
import pytest

import ccx_addon.configstore
from chatclient import AUTH, CHAT, ask, chat_flows, events, health, streamed_text, wait_until
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import chunk, chunk_events, http_head, json_answer, openai_like, sse_answer
from harness import ADDON, BIN, SubprocessGateway, free_port

K1, K2, _ = UPSTREAM_KEYS


@pytest.fixture
def fast_watch(monkeypatch):
    # The watcher reads the interval on every turn: no need to wait a second per check.
    monkeypatch.setattr(ccx_addon.configstore, "WATCH_INTERVAL", 0.05)


@pytest.fixture
def errors(caplog):
    """ERROR records logged anywhere while the test runs (the gateway's thread included)."""
    caplog.set_level(logging.INFO)
    return lambda: [r for r in caplog.records if r.levelno >= logging.ERROR]


def rewrite(gw, text: str) -> None:
    """Replace the config file at once, as editors save (a write in place can be seen half
    done by the watcher, which then logs an error and keeps the old config)."""
    before = gw.config_path.stat().st_mtime_ns
    for _ in range(2):
        staged = gw.config_path.with_name(gw.config_path.name + ".tmp")
        staged.write_text(text)
        os.replace(staged, gw.config_path)
        if gw.config_path.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)  # a coarse clock: make the edit visible


def reload_command(gw) -> None:
    gw.call(gw.master.commands.call, "ccx.reload")


def serving_channel(gw, **kw) -> str:
    return ask(gw, **kw).headers.get("x-ccx-channel", "")


def test_valid_edit_applies_to_new_requests(gateway, upstreams, fast_watch, errors):
    a, b = upstreams(), upstreams()
    gw = gateway(config(channel("a", a.url + "/v1")))
    assert serving_channel(gw) == "a"

    rewrite(gw, config(channel("b", b.url + "/v1", extra="model_mapping: {m: b-model}")))
    assert wait_until(lambda: serving_channel(gw) == "b", 5)
    assert b.received[-1].json["model"] == "b-model"
    assert errors() == []


def test_invalid_edit_is_reported_and_the_last_good_config_stays(gateway, upstreams, fast_watch, caplog):
    a = upstreams()
    gw = gateway(config(channel("a", a.url + "/v1", keys=(K1,))))
    caplog.set_level(logging.INFO)
    bad = config(
        channel("a", a.url + "/v1", keys=(K1,)),
        channel("b", "ftp://127.0.0.1/v1", keys=(K2,)),  # line 7
    )
    rewrite(gw, bad)

    def reported():
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.ERROR and "not reloaded" in r.getMessage()]

    assert wait_until(lambda: reported(), 5)
    [message] = reported()
    assert str(gw.config_path) in message
    assert "line 7" in message and "channels[1].base_url" in message and "http://" in message
    assert "previous one stays in force" in message
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret not in message
    assert serving_channel(gw) == "a"  # the old config serves on
    assert list(health(gw)) == ["a"]

    time.sleep(0.2)
    assert len(reported()) == 1  # reported once, not on every check

    rewrite(gw, config(channel("a2", a.url + "/v1")))  # fixed: picked up
    assert wait_until(lambda: serving_channel(gw) == "a2", 5)


def test_reload_command_with_watching_off(gateway, upstreams):
    a, b = upstreams(), upstreams()
    gw = gateway(config(channel("a", a.url + "/v1")), ccx_config_watch=False)
    rewrite(gw, config(channel("b", b.url + "/v1")))
    time.sleep(0.3)
    assert serving_channel(gw) == "a"  # not watched
    reload_command(gw)
    assert serving_channel(gw) == "b"


def test_reload_re_enables_disabled_keys_and_keeps_cooldowns(gateway, upstreams):
    answers = {K1: lambda r: json_answer(401, {"error": {"message": "bad key"}}),
               K2: lambda r: json_answer(429, {"error": {"message": "slow"}}, {"retry-after": "50"})}
    up = upstreams(lambda r: answers.get(r.headers["authorization"][7:], openai_like)(r))
    gw = gateway(config(channel("pool", up.url + "/v1", keys=(K1, K2))), ccx_config_watch=False)
    assert ask(gw).status_code == 429  # K1 disabled, K2 cooling: the last answer
    keys = health(gw)["pool"]["keys"]
    assert keys[0]["disabled"] == "401 key rejected" and keys[1]["cooling_for_s"] > 40
    assert ask(gw).status_code == 503  # nothing usable

    del answers[K1]  # the user fixed the key at the provider
    reload_command(gw)
    keys = health(gw)["pool"]["keys"]
    assert keys[0]["disabled"] is None
    assert keys[1]["cooling_for_s"] > 40  # the upstream's Retry-After still holds
    r = ask(gw)
    assert r.status_code == 200
    assert chat_flows(gw, 3)[-1].metadata["ccx"]["key"] == "pool#1"


def test_reload_during_a_running_stream(gateway, upstreams, fast_watch, errors):
    pieces = [f"p{i}" for i in range(8)]
    a = upstreams(lambda r: sse_answer(chunk_events("m", pieces), delay=0.15))
    b = upstreams()
    gw = gateway(config(channel("a", a.url + "/v1"), top="circuit_breaker: {backoff: 1}\n"))

    lines = []
    with httpx.stream("POST", gw.url + CHAT, json={"model": "m", "stream": True, "messages": []},
                      headers=AUTH, timeout=10) as response:
        assert response.headers["x-ccx-channel"] == "a"
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                # Channel a disappears, with other breaker settings.
                rewrite(gw, config(channel("b", b.url + "/v1"), top="circuit_breaker: {backoff: 9}\n"))
                assert wait_until(lambda: list(health(gw)) == ["b"], 5)
    payloads = events("\n".join(lines))
    assert streamed_text(payloads) == "".join(pieces) and payloads[-1] == "[DONE]"
    assert serving_channel(gw) == "b"
    assert chat_flows(gw, 2)[0].metadata["ccx"]["channel"] == "a"
    assert errors() == []


def test_stream_failing_after_its_channel_was_reloaded_away(gateway, upstreams, errors):
    """A reload while the upstream prepares its answer removes the channel; the stream that
    then starts and breaks reports to the health registry it started with."""
    head = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})
    first = chunk_events("m", ["x"], usage=False)[0]

    def behaviour(r):
        if r.json["messages"]:
            return openai_like(r)
        return [("sleep", 0.8), ("send", head), ("send", chunk(first)), ("sleep", 0.1), ("reset",)]

    a = upstreams(behaviour)
    gw = gateway(config(channel("a", a.url + "/v1")), ccx_config_watch=False)
    result = {}

    def client():
        with httpx.stream("POST", gw.url + CHAT, json={"model": "m", "stream": True, "messages": []},
                          headers=AUTH, timeout=10) as response:
            result["text"] = response.read().decode()

    thread = threading.Thread(target=client)
    thread.start()
    a.wait_for(1)
    rewrite(gw, config(channel("renamed", a.url + "/v1")))
    reload_command(gw)
    thread.join(10)
    assert events(result["text"])[-1]["error"]["code"] == "stream_interrupted"
    [flow] = chat_flows(gw, 1)
    assert flow.metadata["ccx"]["channel"] == "a"
    assert flow.metadata["ccx"]["stream_failure"].startswith("upstream connection broke mid-stream")
    assert errors() == []
    assert serving_channel(gw) == "renamed"


def test_reload_while_waiting_for_headers(gateway, upstreams, errors):
    slow = upstreams(lambda r: [("sleep", 0.6)] + json_answer(200, {"choices": [], "id": "slow"}))
    gw = gateway(config(channel("a", slow.url + "/v1", keys=(K1,))), ccx_config_watch=False)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=ask(gw, timeout=10)))
    thread.start()
    slow.wait_for(1)
    rewrite(gw, config(channel("b", slow.url + "/v1", keys=(K2,))))
    reload_command(gw)
    thread.join(10)
    assert result["r"].status_code == 200 and result["r"].json()["id"] == "slow"
    assert result["r"].headers["x-ccx-channel"] == "a"
    ask(gw, timeout=10)
    assert [r.headers["authorization"][7:] for r in slow.received] == [K1, K2]
    assert errors() == []


def test_mitmdump_picks_up_edits(write_config, tmp_path, upstreams):
    a, b = upstreams(), upstreams()
    path = write_config(config(channel("a", a.url + "/v1")))
    port = free_port()
    # The long form, as a user writes it with mitmproxy's own flags.
    argv = [str(BIN / "mitmdump"), "-s", str(ADDON), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
            "--set", "connection_strategy=lazy", "--set", f"ccx_config={path}"]
    gw = SubprocessGateway(path, tmp_path, argv=argv, port=port)
    try:
        gw.start()
        assert serving_channel(gw) == "a"
        path.write_text(config(channel("a", a.url + "/v1"), channel("b", "not a url")))
        assert wait_until(lambda: "not reloaded" in gw.log(), 5)
        assert serving_channel(gw) == "a"
        path.write_text(config(channel("b", b.url + "/v1")))
        assert wait_until(lambda: serving_channel(gw) == "b", 5, interval=0.2)
        log = gw.log()
        assert "channels[1].base_url" in log and "reloaded" in log
        assert PROXY_KEY not in log and UPSTREAM_KEYS[0] not in log
    finally:
        gw.stop()
