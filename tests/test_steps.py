"""The attempt loop's steps and the model catalog's decisions, driven one at a time,
without a proxy."""

import time

from ccx_addon.body import parse_chat_request
from ccx_addon.caps import LearnedCaps
from ccx_addon.catalog import CachedList, due_channels, parse_model_list
from ccx_addon.config import parse_config
from ccx_addon.explain import format_config_summary
from ccx_addon.forwarding import (
    AttemptRun, Forwarder, attempt_body, every_candidate_failed, penalise,
)
from ccx_addon.health import HealthRegistry
from ccx_addon.routing import listed_models, plan_routes
from ccx_addon.verdicts import COOLDOWN, DISABLE, NEXT_KEY, Verdict

CONFIG = """
proxy_access_keys: ["pk"]
channels:
  - name: ds
    base_url: http://127.0.0.1:1/v1
    api_keys: ["k1", "k2"]
    preset: deepseek
    supported_models: ["deepseek-*", "gpt-5"]
    model_mapping: {gpt-5: deepseek-chat}
    cooldown: 7
  - name: plain
    base_url: http://127.0.0.1:2/v1
    api_keys: ["k3"]
    supported_models: ["plain-*"]
  - name: opted-out
    base_url: http://127.0.0.1:3/v1
    api_keys: ["k4"]
    preset: glm
    list_upstream_models: false
"""


def make_run(model="gpt-5", body=None):
    config = parse_config(CONFIG)
    raw = body or b'{"model": "%s", "max_tokens": 32000, "messages": []}' % model.encode()
    request = parse_chat_request(raw)
    return AttemptRun(config, HealthRegistry(config), plan_routes(config, model), request, raw, [], 5,
                      caps=LearnedCaps())


def test_next_key_round_robin_and_skip_reason():
    run = make_run()
    route = run.plan.routes[0]
    tried = set()
    assert [Forwarder.next_key(run, route, tried) for _ in range(3)] == [0, 1, None]
    assert not run.attempts  # after tries of its own, the channel needs no excuse
    run.health.pools["ds"].disable(0, "402 payment required")
    run.health.pools["ds"].cool_down(1, 30, time.time())
    assert Forwarder.next_key(run, route, set()) is None
    [skip] = run.attempts
    assert skip.skipped and "ds#1 disabled (402 payment required)" in skip.outcome
    assert run.soonest_retry > time.time() + 25


def test_attempt_body_keeps_the_bytes_and_applies_learned_caps():
    # A channel without a preset: only the model value would change; a learned cap is the
    # one other rewrite, and is labelled.
    run = make_run("plain-1")
    route = run.plan.routes[0]
    assert attempt_body(run, route) == (b'{"model": "plain-1", "max_tokens": 32000, "messages": []}', ())
    run.caps.learn("plain", "plain-1", 8192)
    assert attempt_body(run, route) == (
        b'{"model": "plain-1", "max_tokens": 8192, "messages": []}', ("max_tokens 32000→8192",))
    run.caps.learn("plain", "other-model", 1)  # another upstream model: not applied
    assert b"8192" in attempt_body(run, route)[0]


def test_attempt_body_preset_fixes_then_learned_cap():
    run = make_run()  # gpt-5 -> deepseek-chat on the deepseek preset: clamped to 8192
    route = run.plan.routes[0]
    body, fixes = attempt_body(run, route)
    assert b'"max_tokens":8192' in body.replace(b" ", b"") and b'"deepseek-chat"' in body
    assert any("8192" in label for label in fixes)
    run.caps.learn("ds", "deepseek-chat", 4096)
    body, fixes = attempt_body(run, route)
    assert b'"max_tokens":4096' in body.replace(b" ", b"") and fixes[-1] == "max_tokens 8192→4096"


def test_penalise_cooldown_sources_in_order():
    run = make_run()
    pool = run.health.pools["ds"]
    now = time.time()
    penalise(pool, 0, Verdict(NEXT_KEY, "429", key_penalty=COOLDOWN), {})
    assert 6 < pool.states[0].cooling_until - now <= 7.5  # the channel's cooldown
    penalise(pool, 1, Verdict(NEXT_KEY, "429", key_penalty=COOLDOWN), {"Retry-After": "20"})
    assert 19 < pool.states[1].cooling_until - now <= 21
    announced = Verdict(NEXT_KEY, "429 1308", key_penalty=COOLDOWN, cool_until=now + 3600)
    penalise(pool, 1, announced, {"Retry-After": "20"})
    assert 3590 < pool.states[1].cooling_until - now <= 3601  # the announced reset wins
    penalise(pool, 0, Verdict(NEXT_KEY, "429 quota", key_penalty=DISABLE), {})
    assert pool.states[0].disabled == "429 quota"


def test_every_candidate_failed_answers():
    run = make_run()
    skipped = every_candidate_failed(run)
    assert skipped.status == 503  # nothing tried
    route = run.plan.routes[0]
    attempt = run.start(route, 0)
    attempt.outcome = "cannot connect: Connection refused"
    run.any_timeout = True
    failed = every_candidate_failed(run)
    assert failed.status == 504 and b"ds (ds#1): cannot connect" in failed.body
    run.last_answer = run.result(route, 200, "OK", [], body=b"data: {}")
    assert every_candidate_failed(run).status == 502  # a 200 with an error is never a success


def test_parse_model_list():
    assert parse_model_list(b'{"data": [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"x": 1}, "c", {"id": "\\n"}]}') == ("a", "b")
    assert parse_model_list(b'{"object": "list"}') is None
    assert parse_model_list(b"<html>") is None


def test_due_channels_and_listed_models():
    config = parse_config(CONFIG)
    now = 1000.0
    assert [c.name for c in due_channels(config.channels, {}, 600, now)] == ["ds"]  # preset on, opted-out off
    cache = {"ds": CachedList(config.channels[0].base_url, ("deepseek-chat",), tried_at=now, ok=True)}
    assert due_channels(config.channels, cache, 600, now + 599) == []
    assert [c.name for c in due_channels(config.channels, cache, 600, now + 600)] == ["ds"]
    cache["ds"].ok = False
    assert [c.name for c in due_channels(config.channels, cache, 600, now + 60)] == ["ds"]  # a failure retries sooner
    cache["ds"].base_url = "http://elsewhere/v1"
    assert [c.name for c in due_channels(config.channels, cache, 600, now)] == ["ds"]  # a changed upstream refetches

    upstream = {
        "ds": (config.channels[0].base_url, ("deepseek-chat", "deepseek-reasoner", "not-allowed")),
        "plain": (config.channels[1].base_url, ("plain-a",)),  # not opted in: ignored
        "opted-out": ("http://127.0.0.1:3/v1", ("glm-x",)),
    }
    assert listed_models(config, upstream) == ["deepseek-chat", "deepseek-reasoner", "gpt-5"]
    stale = {"ds": ("http://old/v1", ("deepseek-old",))}
    assert "deepseek-old" not in listed_models(config, stale)


def test_check_says_which_upstream_lists_are_added():
    assert "upstream model lists of: ds\n" in format_config_summary(parse_config(CONFIG)) + "\n"


def test_list_upstream_models_is_validated():
    import pytest

    from ccx_addon.config import ConfigError

    base = 'proxy_access_keys: ["pk"]\nchannels:\n  - name: a\n    base_url: {url}\n{keys}    list_upstream_models: {value}\n'
    config = parse_config(base.format(url="http://h/v1", keys='    api_keys: ["k"]\n', value="true"))
    assert config.channels[0].lists_upstream_models and config.channels[0].models_url == "http://h/v1/models"
    config = parse_config(base.format(url="http://h/v1", keys='    api_keys: ["k"]\n', value="off"))
    assert not config.channels[0].lists_upstream_models
    with pytest.raises(ConfigError, match=r"<config>, line 6, channels\[0\].list_upstream_models: must be true or false"):
        parse_config(base.format(url="http://h/v1", keys='    api_keys: ["k"]\n', value="[1]"))
    with pytest.raises(ConfigError, match="the echo: channel has no upstream model list"):
        parse_config(base.format(url="'echo:'", keys="", value="true"))
    # The default: on with a preset, off without one, never for echo.
    assert parse_config(CONFIG).channels[0].lists_upstream_models
    assert not parse_config(CONFIG).channels[1].lists_upstream_models
