"""Key pools, circuit breakers, Retry-After and the classification of upstream answers, as
pure state machines stepped with an explicit `now`."""

import email.utils
import json

import pytest

from ccx_addon.config import BreakerSettings, Channel, parse_config
from ccx_addon.health import CircuitBreaker, HealthRegistry, KeyPool
from ccx_addon.upstream import parse_retry_after

T0 = 1_700_000_000.0


def make_channel(keys=("k1", "k2", "k3"), name="ch", base_url="http://127.0.0.1:1/v1") -> Channel:
    return Channel(name=name, base_url=base_url, api_keys=tuple(keys))


def picks(pool: KeyPool, count: int, now: float = T0) -> list[int | None]:
    return [pool.pick(now, set())[0] for _ in range(count)]


# --- KeyPool ----------------------------------------------------------------------------------


def test_keys_are_handed_out_round_robin():
    pool = KeyPool(make_channel())
    assert picks(pool, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_cooling_key_is_skipped_until_its_time_is_up():
    pool = KeyPool(make_channel())
    pool.cool_down(1, 30, T0)
    assert picks(pool, 4, T0 + 29.9) == [0, 2, 0, 2]
    assert picks(pool, 3, T0 + 30) == [0, 1, 2]


def test_cool_down_never_shortens_a_longer_cooldown():
    pool = KeyPool(make_channel(keys=("k1",)))
    pool.cool_down(0, 60, T0)
    pool.cool_down(0, 5, T0)
    assert pool.pick(T0 + 10, set()) == (None, "key ch#1 cooling down for 50s")


def test_disabled_key_stays_out_and_is_named_by_label_only():
    pool = KeyPool(make_channel(keys=("sk-secret-1", "sk-secret-2")))
    pool.disable(0, "401 key rejected")
    assert picks(pool, 3, T0 + 10**6) == [1, 1, 1]
    pool.disable(1, "402 payment required")
    index, why = pool.pick(T0, set())
    assert index is None
    assert why == "key ch#1 disabled (401 key rejected); key ch#2 disabled (402 payment required)"
    assert "sk-secret" not in why


def test_keys_already_tried_by_this_request_are_not_picked_again():
    pool = KeyPool(make_channel())
    assert pool.pick(T0, {0, 1}) == (2, "")
    assert pool.pick(T0, {0, 1, 2}) == (None, "every key already tried")


def test_soonest_ready():
    pool = KeyPool(make_channel(keys=("a", "b", "c")))
    assert pool.soonest_ready(T0) == T0  # a key is usable now
    pool.cool_down(0, 40, T0)
    pool.cool_down(1, 15, T0)
    pool.disable(2, "401")
    assert pool.soonest_ready(T0) == T0 + 15
    pool.disable(1, "401")
    assert pool.soonest_ready(T0) == T0 + 40
    pool.disable(0, "401")
    assert pool.soonest_ready(T0) is None  # nothing comes back without a reload


def test_echo_channel_has_one_keyless_slot():
    pool = KeyPool(Channel(name="echo", base_url="echo:", api_keys=()))
    assert picks(pool, 2) == [0, 0]


# --- CircuitBreaker ---------------------------------------------------------------------------


def fail(breaker: CircuitBreaker, times: int, now: float = T0) -> None:
    for _ in range(times):
        breaker.record(False, now)


def test_breaker_opens_after_consecutive_failures():
    breaker = CircuitBreaker(BreakerSettings())
    fail(breaker, 4)
    assert breaker.state == "closed" and breaker.allow(T0)
    fail(breaker, 1)
    assert breaker.state == "open"
    assert not breaker.allow(T0 + 4.9)
    assert breaker.describe(T0 + 1) == "circuit open after repeated failures, next probe in 4s"
    assert breaker.retry_at(T0 + 1) == T0 + 5


def test_a_success_resets_the_consecutive_count():
    breaker = CircuitBreaker(BreakerSettings(failure_ratio=1.0))  # consecutive rule only
    for _ in range(3):
        fail(breaker, 4)
        breaker.record(True, T0)
    assert breaker.state == "closed"


def test_breaker_opens_on_failure_ratio_over_the_window():
    settings = BreakerSettings(consecutive_failures=100)  # ratio rule only
    breaker = CircuitBreaker(settings)
    # F S F S: 50% but only 4 samples (< min_samples 5).
    for ok in (False, True, False, True):
        breaker.record(ok, T0)
    assert breaker.state == "closed"
    breaker.record(True, T0)  # 2/5 = 40%
    assert breaker.state == "closed"
    breaker.record(False, T0)  # 3/6 = 50%
    assert breaker.state == "open"


def test_failure_ratio_only_counts_the_last_window_results():
    breaker = CircuitBreaker(BreakerSettings(consecutive_failures=100, window=10))
    for ok in [False] * 4 + [True] * 10:  # the early failures slide out of the window
        breaker.record(ok, T0)
    breaker.record(False, T0)  # 1/10
    assert breaker.state == "closed"
    for _ in range(3):
        breaker.record(False, T0)
    assert breaker.state == "closed"  # 4/10
    breaker.record(False, T0)  # 5/10
    assert breaker.state == "open"


def test_one_probe_after_backoff_and_backoff_grows_while_probes_fail():
    breaker = CircuitBreaker(BreakerSettings(backoff=5, max_backoff=18))
    fail(breaker, 5)
    now = T0
    for expected_backoff in (5, 10, 18, 18):
        assert not breaker.allow(now + expected_backoff - 0.1)
        now += expected_backoff
        assert breaker.allow(now)  # the probe
        assert breaker.state == "half-open"
        assert not breaker.allow(now)  # only one at a time
        assert "probe request is in flight" in breaker.describe(now)
        breaker.record(False, now, probe=True)
        assert breaker.state == "open"


def test_successful_probe_closes_and_resets_backoff():
    breaker = CircuitBreaker(BreakerSettings(backoff=5))
    fail(breaker, 5)
    assert breaker.allow(T0 + 5)
    breaker.record(False, T0 + 5, probe=True)  # back-off now 10
    assert breaker.allow(T0 + 15)
    breaker.record(True, T0 + 15, probe=True)
    assert breaker.state == "closed" and breaker.allow(T0 + 15) and breaker.allow(T0 + 15)
    fail(breaker, 5, T0 + 20)
    assert breaker.open_until == T0 + 25  # the back-off started over


def test_late_results_of_older_requests_do_not_count_while_open_or_half_open():
    breaker = CircuitBreaker(BreakerSettings(backoff=5))
    fail(breaker, 5)
    fail(breaker, 3, T0 + 4)  # requests that started before it opened
    assert breaker.open_until == T0 + 5
    assert breaker.allow(T0 + 5)
    breaker.record(True, T0 + 6)  # not the probe: no verdict
    assert breaker.state == "half-open"
    breaker.record(False, T0 + 6)
    assert breaker.state == "half-open" and breaker.backoff == 5
    breaker.record(True, T0 + 7, probe=True)
    assert breaker.state == "closed"


def test_released_probe_lets_the_next_request_probe():
    breaker = CircuitBreaker(BreakerSettings())
    fail(breaker, 5)
    assert breaker.allow(T0 + 5)
    breaker.release_probe()  # the client left before any verdict
    assert breaker.allow(T0 + 5)
    assert not breaker.allow(T0 + 5)


# --- HealthRegistry across reloads ------------------------------------------------------------

CONFIG = """
proxy_access_keys: ["pk"]
channels:
  - {name: a, base_url: "http://127.0.0.1:1/v1", api_keys: [ka1, ka2]}
  - {name: b, base_url: "http://127.0.0.1:2/v1", api_keys: [kb1]}
"""


def test_reload_re_enables_keys_but_keeps_cooldowns_and_breakers():
    old = HealthRegistry(parse_config(CONFIG))
    old.pools["a"].disable(0, "401 key rejected")
    old.pools["a"].cool_down(1, 60, T0)
    fail(old.breakers["b"], 5)

    new = HealthRegistry(parse_config(CONFIG), previous=old)
    assert new.pools["a"].pick(T0, set()) == (0, "")  # re-enabled
    assert new.pools["a"].states[1].cooling_until == T0 + 60
    assert new.breakers["b"] is old.breakers["b"] and not new.breakers["b"].allow(T0)


def test_reload_forgets_health_of_changed_upstreams_and_keys():
    old = HealthRegistry(parse_config(CONFIG))
    old.pools["a"].cool_down(0, 60, T0)
    old.pools["a"].cool_down(1, 60, T0)
    fail(old.breakers["b"], 5)
    edited = CONFIG.replace("[ka1, ka2]", "[ka2, ka3]").replace("127.0.0.1:2", "127.0.0.1:3")
    edited += "circuit_breaker: {backoff: 9}\n"

    new = HealthRegistry(parse_config(edited), previous=old)
    # ka2 moved to slot 0 and keeps its cooldown; ka3 is new.
    assert [s.cooling_until for s in new.pools["a"].states] == [T0 + 60, 0.0]
    assert new.breakers["b"].state == "closed"
    assert new.breakers["a"] is not old.breakers["a"]  # other settings: a fresh breaker


def test_snapshot_names_keys_by_label():
    registry = HealthRegistry(parse_config(CONFIG))
    registry.pools["a"].disable(1, "401 key rejected")
    registry.pools["b"].cool_down(0, 12, T0)
    snapshot = registry.snapshot(T0)
    assert snapshot["a"]["keys"][1] == {"key": "a#2", "disabled": "401 key rejected", "cooling_for_s": 0, "sessions": 0}
    assert snapshot["b"]["keys"][0]["cooling_for_s"] == 12
    assert "ka" not in json.dumps(snapshot) and "kb1" not in json.dumps(snapshot)


# --- parse_retry_after ----------------------------------------------------------------------------


@pytest.mark.parametrize("headers, expected", [
    ({}, None),
    ({"Retry-After": "7"}, 7.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after": "-3"}, 0.0),
    ({"retry-after-ms": "2500"}, 2.5),
    ({"retry-after-ms": "2500", "retry-after": "9"}, 2.5),  # the precise one wins
    ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
    ({"retry-after": "whenever"}, None),
    ({"retry-after": email.utils.formatdate(T0 + 90, usegmt=True)}, 90.0),
    ({"retry-after": email.utils.formatdate(T0 - 90, usegmt=True)}, 0.0),
])
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers, T0) == expected
