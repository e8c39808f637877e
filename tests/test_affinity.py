"""Session affinity: the turns of one client session stay on one key of a channel.

Gateway tests run a channel of three keys against a fake upstream that tells which key each
request carried (its position in UPSTREAM_KEYS); requests are sent one at a time, so the
upstream's n-th request is the gateway's n-th upstream attempt. Pure logic (the binding
store, TTL, LRU, reload) is stepped with an explicit `now` below.
"""

import collections
import time

import pytest

from ccx_addon.config import AffinitySettings, Channel, ConfigError, parse_config
from ccx_addon.explain import explain_model, format_config_summary, format_explanation
from ccx_addon.health import HealthRegistry, KeyPool, SessionBindings
from chatclient import AUTH, ask, chat_flows, events, health, streamed_text
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import json_answer, openai_like

T0 = 1_700_000_000.0
THREE = UPSTREAM_KEYS


def key_of(received) -> int:
    """Which of UPSTREAM_KEYS an upstream request carried (0, 1 or 2)."""
    return THREE.index(received.headers["authorization"].removeprefix("Bearer "))


def keys_since(upstream, start: int) -> list[int]:
    return [key_of(r) for r in upstream.received[start:]]


def turn(gw, session: str | None, stream: bool = False, header: str = "x-session-id"):
    headers = dict(AUTH)
    if session is not None:
        headers[header] = session
    response = ask(gw, stream=stream, headers=headers)
    assert response.status_code == 200, response.text
    if stream:
        assert streamed_text(events(response.text)) == "hello from upstream"
    return response


def pool_config(url: str, top: str = "", extra: str = "") -> str:
    return config(channel("pool", url + "/v1", keys=THREE, extra=extra), top=top)


# --- through a real gateway -------------------------------------------------------------------


def test_one_sessions_turns_streamed_and_not_stay_on_one_key(gateway, upstreams):
    up = upstreams()
    gw = gateway(pool_config(up.url))
    turn(gw, None)  # moves the rotation, so the session does not simply start at key 1
    start = len(up.received)
    for i in range(8):
        turn(gw, "ses_0a1b2c3d4e5f6a7b8c9d0e1f2a", stream=i % 2 == 1)
    used = keys_since(up, start)
    assert len(used) == 8 and len(set(used)) == 1, used
    # The flow comment and the log show the binding: new on the first turn, kept after.
    comments = [f.comment for f in chat_flows(gw, 9)[1:]]
    label = f"pool#{used[0] + 1}"
    assert comments[0].endswith(f" | session 9d0e1f2a → {label} (new)"), comments[0]
    assert all(c.endswith(f" | session 9d0e1f2a → {label}") for c in comments[1:]), comments


def test_new_sessions_spread_over_the_pool_and_stay(gateway, upstreams):
    up = upstreams()
    gw = gateway(pool_config(up.url))
    sessions = [f"ses_spread_{i}" for i in range(6)]
    first = {}
    for s in sessions:
        start = len(up.received)
        turn(gw, s)
        first[s] = keys_since(up, start)[0]
    assert len(set(first.values())) == 3, first  # rotation: every key got new sessions
    for s in reversed(sessions):  # second turns, in another order: each on its own key
        start = len(up.received)
        turn(gw, s, stream=True)
        assert keys_since(up, start) == [first[s]], s
    counts = {k["key"]: k["sessions"] for k in health(gw)["pool"]["keys"]}
    assert counts == {"pool#1": 2, "pool#2": 2, "pool#3": 2}


def test_requests_without_a_session_id_still_rotate(gateway, upstreams):
    up = upstreams()
    gw = gateway(pool_config(up.url))
    turn(gw, "ses_bound_elsewhere")
    start = len(up.received)
    for _ in range(6):
        turn(gw, None)
    used = keys_since(up, start)
    assert used == used[:3] * 2 and sorted(used) == [0, 0, 1, 1, 2, 2], used
    assert "session" not in chat_flows(gw, 7)[-1].comment


def test_x_session_affinity_alone_is_honoured(gateway, upstreams):
    up = upstreams()
    gw = gateway(pool_config(up.url))
    start = len(up.received)
    for i in range(5):
        turn(gw, "aff-7c1e55d0", stream=i == 2, header="x-session-affinity")
        turn(gw, None)  # interleaved rotation does not move the session
    used = keys_since(up, start)
    session_keys = used[0::2]
    assert len(set(session_keys)) == 1, used
    assert len(set(used[1::2])) > 1, used
    assert "session 7c1e55d0 → pool#" in chat_flows(gw, 10)[0].comment


def test_a_bound_key_answering_429_moves_the_session_once_and_it_stays(gateway, upstreams):
    resting: set[int] = set()

    def behaviour(r):
        if key_of(r) in resting:
            return json_answer(429, {"error": {"message": "rate limited"}}, {"retry-after": "1"})
        return openai_like(r)

    up = upstreams(behaviour)
    gw = gateway(pool_config(up.url))
    session = "ses_moving_0f9e8d7c"
    start = len(up.received)
    turn(gw, session)
    turn(gw, session, stream=True)
    [bound] = set(keys_since(up, start))

    resting.add(bound)
    start = len(up.received)
    turn(gw, session)
    first_try, moved_to = keys_since(up, start)
    assert first_try == bound and moved_to != bound
    comment = chat_flows(gw, 3)[-1].comment
    assert f"session 0f9e8d7c → pool#{moved_to + 1} (moved from pool#{bound + 1}: cooling)" in comment, comment

    # It stays on the new key: while the old one rests, and after it is healthy again.
    start = len(up.received)
    for i in range(4):
        turn(gw, session, stream=i % 2 == 0)
    time.sleep(1.2)  # the old key's Retry-After is over
    resting.clear()
    for i in range(4):
        turn(gw, session, stream=i % 2 == 1)
    assert keys_since(up, start) == [moved_to] * 8
    assert chat_flows(gw, 11)[-1].comment.endswith(f"session 0f9e8d7c → pool#{moved_to + 1}")


def test_a_session_that_fails_over_is_bound_on_the_second_channel_too(gateway, upstreams):
    broken = upstreams(lambda r: json_answer(503, {"error": {"message": "overloaded"}}))
    up = upstreams()
    gw = gateway(config(
        channel("first", broken.url + "/v1", keys=THREE),
        channel("second", up.url + "/v1", keys=THREE),
    ))
    turn(gw, None)  # rotate "second" once
    start = len(up.received)
    for _ in range(4):
        turn(gw, "ses_failover_aa11bb22")
    used = keys_since(up, start)
    assert len(set(used)) == 1, used
    comments = [f.comment for f in chat_flows(gw, 5)[1:]]
    assert comments[0].startswith("✓ second") and f"→ second#{used[0] + 1} (new)" in comments[0]
    assert comments[-1].endswith(f"session aa11bb22 → second#{used[0] + 1}"), comments[-1]


def test_a_channel_can_turn_affinity_off(gateway, upstreams):
    up = upstreams()
    gw = gateway(pool_config(up.url, extra="session_affinity: false"))
    start = len(up.received)
    for _ in range(3):
        turn(gw, "ses_rotating")
    assert sorted(keys_since(up, start)) == [0, 1, 2]
    assert chat_flows(gw, 3)[-1].comment.endswith("session rotating")


def test_a_reload_keeps_bindings_whose_channel_and_key_still_exist(gateway, upstreams):
    up = upstreams()
    gw = gateway(pool_config(up.url))
    sessions = ["ses_reload_a", "ses_reload_b", "ses_reload_c"]
    bound = {}
    for s in sessions:
        start = len(up.received)
        turn(gw, s)
        bound[s] = THREE[keys_since(up, start)[0]]
    # The keys change places and one goes away: bindings follow the key, not its position.
    kept = [k for k in THREE if k != bound["ses_reload_c"]]
    gw.config_path.write_text(config(channel("pool", up.url + "/v1", keys=tuple(reversed(kept)))))
    gw.call(gw.master.commands.call, "ccx.reload")
    for s in ("ses_reload_a", "ses_reload_b", "ses_reload_a", "ses_reload_b"):
        start = len(up.received)
        turn(gw, s)
        assert THREE[keys_since(up, start)[0]] == bound[s], s
    start = len(up.received)
    turn(gw, "ses_reload_c")  # its key is gone: a new binding
    assert THREE[keys_since(up, start)[0]] in kept
    assert chat_flows(gw, 8)[-1].comment.endswith("(new)")


def test_the_summary_log_line_shows_the_binding(gateway, upstreams, caplog):
    import logging

    caplog.set_level(logging.INFO)
    up = upstreams()
    gw = gateway(pool_config(up.url))
    turn(gw, "ses_logline_12345678")
    chat_flows(gw, 1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST /v1/chat/completions")]
    assert lines and lines[-1].endswith("| session 12345678 → pool#1 (new)"), lines


# --- the binding store, stepped in time ---------------------------------------------------------


def make_pool(name="pool", keys=("k1", "k2", "k3"), affinity=True) -> KeyPool:
    return KeyPool(Channel(name=name, base_url="http://127.0.0.1:1/v1", api_keys=tuple(keys), session_affinity=affinity))


def pick(pool: KeyPool, store: SessionBindings, session: str, now: float = T0, tried=()):
    choice = store.choice(session, now)
    index, _ = pool.pick(now, set(tried), choice)
    return index, choice.note


def test_pick_binds_new_sessions_in_rotation_and_keeps_them():
    pool, store = make_pool(), SessionBindings(AffinitySettings())
    assert [pick(pool, store, s) for s in "abc"] == [
        (0, "→ pool#1 (new)"), (1, "→ pool#2 (new)"), (2, "→ pool#3 (new)")]
    assert [pick(pool, store, s)[0] for s in "cbacba"] == [2, 1, 0, 2, 1, 0]
    assert pick(pool, store, "a") == (0, "→ pool#1")
    assert pool.pick(T0, set()) == (0, "")  # sessionless requests rotate on their own


def test_a_session_moves_once_when_its_key_rests_and_does_not_come_back():
    pool, store = make_pool(), SessionBindings(AffinitySettings())
    assert pick(pool, store, "s")[0] == 0
    pool.cool_down(0, 30, T0)
    assert pick(pool, store, "s", T0 + 1) == (1, "→ pool#2 (moved from pool#1: cooling)")
    assert pick(pool, store, "s", T0 + 100) == (1, "→ pool#2")  # key 1 is back: no bounce
    pool.disable(1, "401 key rejected")
    assert pick(pool, store, "s", T0 + 101) == (2, "→ pool#3 (moved from pool#2: disabled)")
    assert pick(pool, store, "s", T0 + 102, tried={2}) == (0, "→ pool#1 (moved from pool#3: failed)")


def test_bindings_expire_after_the_ttl_since_the_last_request():
    pool, store = make_pool(), SessionBindings(AffinitySettings(ttl=60))
    pick(pool, store, "old")
    pick(pool, store, "kept")
    assert pick(pool, store, "kept", T0 + 50)[1] == "→ pool#2"
    assert pick(pool, store, "kept", T0 + 100)[1] == "→ pool#2"  # 50 s since its last request
    assert pick(pool, store, "old", T0 + 61)[1].endswith("(new)")


def test_the_store_keeps_at_most_max_sessions_least_recently_used_first():
    pool, store = make_pool(), SessionBindings(AffinitySettings(max_sessions=100))
    notes = {}
    for i in range(1000):
        notes[f"s{i}"] = pick(pool, store, f"s{i}", T0 + i * 0.001)[1]
        if i == 950:
            pick(pool, store, "s900", T0 + i * 0.001)  # used again: now the most recent
    assert len(store) == 100
    assert sum(store.counts().values()) == 100
    assert pick(pool, store, "s999", T0 + 2)[1] == notes["s999"].removesuffix(" (new)")
    assert pick(pool, store, "s900", T0 + 2)[1] == notes["s900"].removesuffix(" (new)")
    assert pick(pool, store, "s899", T0 + 2)[1].endswith("(new)")  # forgotten, least recently used


def test_long_session_ids_are_bound_by_their_hash():
    pool, store = make_pool(), SessionBindings(AffinitySettings())
    long_a, long_b = "a" * 10_000 + "1", "a" * 10_000 + "2"
    assert pick(pool, store, long_a)[0] == 0
    assert pick(pool, store, long_b)[0] == 1  # the whole id counts, not a prefix
    assert pick(pool, store, long_a) == (0, "→ pool#1")
    assert all(len(sid) <= 128 for sid in store._sessions)


def test_single_key_pools_and_channels_with_affinity_off_bind_nothing():
    store = SessionBindings(AffinitySettings())
    assert pick(make_pool(keys=("only",)), store, "s") == (0, "")
    off = make_pool(affinity=False)
    assert [pick(off, store, "s")[0] for _ in range(3)] == [0, 1, 2]
    assert len(store) == 0


def test_reload_carries_bindings_by_key_and_drops_the_rest():
    def cfg(keys, name="pool", max_sessions=10_000):
        key_list = ", ".join(f'"{k}"' for k in keys)
        return parse_config(
            f'proxy_access_keys: ["p"]\nsession_affinity: {{max_sessions: {max_sessions}}}\n'
            f'channels:\n  - name: {name}\n    base_url: http://127.0.0.1:1/v1\n    api_keys: [{key_list}]\n',
            environ={},
        )

    old = HealthRegistry(cfg(["k1", "k2", "k3"]))
    for s in ("a", "b", "c"):
        old.pools["pool"].pick(T0, set(), old.session_choice(s, T0))
    new = HealthRegistry(cfg(["k3", "k1"]), previous=old)
    assert new.session_choice("a", T0 + 1).bound("pool") == 1  # k1, now second
    assert new.session_choice("b", T0 + 1).bound("pool") is None  # k2 is gone
    assert new.session_choice("c", T0 + 1).bound("pool") == 0  # k3, now first
    renamed = HealthRegistry(cfg(["k1", "k2", "k3"], name="other"), previous=new)
    assert len(renamed.sessions) == 0
    smaller = HealthRegistry(cfg(["k1", "k2", "k3"], max_sessions=1), previous=old)
    assert len(smaller.sessions) == 1 and smaller.session_choice("c", T0).bound("pool") == 2


# --- config, check and explain ----------------------------------------------------------------


def parse(text: str):
    return parse_config(f'proxy_access_keys: ["{PROXY_KEY}"]\n' + text, "ccx.yaml", environ={})


CHANNELS = (
    "channels:\n"
    "  - name: a\n    base_url: https://a.example/v1\n    api_keys: [k1, k2]\n"
    "  - name: b\n    base_url: https://b.example/v1\n    api_keys: [k3, k4]\n    session_affinity: false\n"
)


def test_session_affinity_config_forms_and_overrides():
    on = parse(CHANNELS)
    assert on.session_affinity == AffinitySettings()
    assert [c.session_affinity for c in on.channels] == [True, False]
    off = parse("session_affinity: false\n" + CHANNELS.replace("session_affinity: false", "session_affinity: true"))
    assert off.session_affinity.enabled is False
    assert [c.session_affinity for c in off.channels] == [False, True]
    tuned = parse("session_affinity: {ttl: 600, max_sessions: 50}\n" + CHANNELS)
    assert tuned.session_affinity == AffinitySettings(enabled=True, ttl=600, max_sessions=50)


@pytest.mark.parametrize("text, where", [
    ("session_affinity: sometimes\n", "line 2, session_affinity: must be true or false"),
    ("session_affinity: {ttl: 0}\n", "line 2, session_affinity.ttl: must be at least 1"),
    ("session_affinity: {max_sessions: 1.5}\n", "session_affinity.max_sessions: must be a whole number"),
    ("session_affinity: {enable: true}\n", "session_affinity.enable: unknown field"),
])
def test_bad_session_affinity_settings_are_refused_with_file_line_and_field(text, where):
    with pytest.raises(ConfigError) as e:
        parse(text + CHANNELS)
    assert str(e.value).startswith("ccx.yaml, ") and where in str(e.value), str(e.value)


def test_bad_channel_override_names_the_channel():
    with pytest.raises(ConfigError) as e:
        parse(CHANNELS.replace("session_affinity: false", "session_affinity: [1]"))
    assert "line 9, channels[1].session_affinity: must be true or false" in str(e.value)


def test_explain_and_check_mention_affinity():
    cfg = parse(CHANNELS.replace("  - name: b", "  - name: b\n    priority: 9"))
    text = format_explanation(explain_model(cfg, "gpt-5"))
    assert "Session affinity: a request with x-session-id (or x-session-affinity) stays on one key of a" in text
    assert "4h after a session's last request, at most 10000 sessions" in text and "Off for b." in text
    assert "session affinity off" in format_config_summary(cfg)
    snapshot = {"a": {"circuit": "closed", "keys": [{"key": "a#1", "sessions": 3}, {"key": "a#2", "sessions": 0}]}}
    assert "now: sessions bound a#1 3" in format_explanation(explain_model(cfg, "gpt-5"), snapshot)
    off = parse("session_affinity: false\n" + CHANNELS)
    assert "Session affinity: off; keys are used round robin." in format_explanation(explain_model(off, "m"))


def test_the_schema_knows_the_affinity_fields_and_defaults():
    import json
    from pathlib import Path

    from ccx_addon import config as ccx_config

    schema = json.loads((Path(__file__).resolve().parent.parent / "config" / "ccx.schema.json").read_text())
    top = schema["properties"]["session_affinity"]
    assert set(top["properties"]) == ccx_config._AFFINITY_FIELDS
    for name, field in top["properties"].items():
        assert field["default"] == getattr(AffinitySettings(), name), name
    assert "session_affinity" in schema["definitions"]["channel"]["properties"]


def test_the_session_id_is_x_session_id_else_x_session_affinity_whole():
    from mitmproxy import http

    from ccx_addon.gateway import client_session_id

    def of(*fields):
        return client_session_id(http.Headers([(k.encode(), v.encode()) for k, v in fields]))

    long_id = "ses_" + "x" * 300
    assert of(("X-Session-Affinity", "aff"), ("X-Session-Id", f" {long_id} ")) == long_id
    assert of(("x-session-id", " "), ("x-session-affinity", "aff-1")) == "aff-1"
    assert of(("x-session-id", "first"), ("x-session-id", "second")) == "first"
    assert of(("authorization", "Bearer x")) == ""


def test_session_counts_follow_binds_moves_expiry_and_eviction():
    pool, store = make_pool(), SessionBindings(AffinitySettings(ttl=60, max_sessions=3))

    def counts():
        return {k: v for k, v in store.counts().items() if v}

    for s in "abc":
        pick(pool, store, s)
    assert counts() == {("pool", 0): 1, ("pool", 1): 1, ("pool", 2): 1}
    pool.cool_down(0, 30, T0)
    pick(pool, store, "a", T0 + 1)  # moves from key 1 to key 2
    assert counts() == {("pool", 1): 2, ("pool", 2): 1}
    pick(pool, store, "d", T0 + 2)  # evicts b, the least recently used
    assert sum(counts().values()) == 3 and len(store) == 3
    pick(pool, store, "e", T0 + 100)  # the others expired
    assert len(store) == 1 and sum(counts().values()) == 1
    recount = collections.Counter(
        (c, i) for entry in store._sessions.values() for c, i in entry.keys.items())
    assert counts() == dict(recount)
