"""Upstream health: per-key cooldowns and disables, per-channel circuit breakers.

Pure state machines driven by an explicit `now`, so tests step time instead of sleeping.
"""

import collections
import dataclasses

from .config import BreakerSettings, Channel, GatewayConfig
from .keylimits import KeyLimits


@dataclasses.dataclass
class KeyState:
    cooling_until: float = 0.0
    disabled: str = ""  # why; only a reload or restart brings the key back


class KeyPool:
    """A channel's upstream keys, handed out round robin among the healthy ones."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        # The echo channel has no key but still needs one slot to be picked.
        self.states = [KeyState() for _ in channel.api_keys or ("",)]
        self._next = 0
        # Weights and rpm/concurrency limits (keylimits.py): consulted in pick's loop only.
        self.limits = KeyLimits(channel, len(self.states))

    def pick(self, now: float, tried: set[int]) -> tuple[int | None, str]:
        """The next usable key index, or None and why none is usable."""
        for index in self.limits.order(self._next):
            state = self.states[index]
            if index in tried or state.disabled or state.cooling_until > now or self.limits.blocked(index, now):
                continue
            self._next = self.limits.chosen(index)
            return index, ""
        return None, self.describe_unusable(now, tried)

    def describe_unusable(self, now: float, tried: set[int]) -> str:
        reasons = []
        for index, state in enumerate(self.states):
            label = self.channel.key_label(index)
            if index in tried:
                continue
            if state.disabled:
                reasons.append(f"key {label} disabled ({state.disabled})")
            elif state.cooling_until > now:
                reasons.append(f"key {label} cooling down for {state.cooling_until - now:.0f}s")
            elif why := self.limits.blocked(index, now):
                reasons.append(f"key {label} at its limit: {why}")
        return "; ".join(reasons) or "every key already tried"

    def soonest_ready(self, now: float) -> float | None:
        """When a key is usable again (cooldowns and limits), None when every key is disabled."""
        times = [
            max(s.cooling_until, self.limits.free_at(i, now))
            for i, s in enumerate(self.states) if not s.disabled
        ]
        return max(now, min(times)) if times else None

    def at_limit(self, now: float) -> list[str]:
        """Keys passed over only for their rpm/concurrency limit, each with its limit."""
        return [
            f"{self.channel.key_label(i)} ({why})"
            for i, s in enumerate(self.states)
            if not s.disabled and s.cooling_until <= now and (why := self.limits.blocked(i, now))
        ]

    def cool_down(self, index: int, seconds: float, now: float) -> None:
        state = self.states[index]
        state.cooling_until = max(state.cooling_until, now + seconds)

    def disable(self, index: int, reason: str) -> None:
        self.states[index].disabled = reason


class CircuitBreaker:
    """Opens after repeated failures, lets one probe through after a back-off that doubles
    while probes keep failing, closes on success."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self.state = self.CLOSED
        self.results: collections.deque[bool] = collections.deque(maxlen=settings.window)
        self.consecutive_failures = 0
        self.open_until = 0.0
        self.backoff = settings.backoff
        self.probe_in_flight = False

    def allow(self, now: float) -> bool:
        if self.state == self.CLOSED:
            return True
        if self.state == self.OPEN and now >= self.open_until:
            self.state = self.HALF_OPEN
            self.probe_in_flight = False
        if self.state == self.HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def describe(self, now: float) -> str:
        if self.state == self.OPEN:
            return f"circuit open after repeated failures, next probe in {max(0.0, self.open_until - now):.0f}s"
        return "circuit half-open, a probe request is in flight"

    def retry_at(self, now: float) -> float:
        return self.open_until if self.state == self.OPEN else now + 1.0

    def record(self, success: bool, now: float, probe: bool = False) -> None:
        """One result. `probe`: the request was let through by a half-open breaker. Results
        of requests that started before the breaker opened arrive late: they are stale and
        must neither extend the open period nor pass for the probe's verdict."""
        if self.state == self.OPEN or (self.state == self.HALF_OPEN and not probe):
            return
        if self.state == self.HALF_OPEN:
            self.probe_in_flight = False
            if success:
                self._close()
            else:
                self.backoff = min(self.backoff * 2, self.settings.max_backoff)
                self._open(now)
            return
        self.results.append(success)
        if success:
            self.consecutive_failures = 0
            return
        self.consecutive_failures += 1
        failures = self.results.count(False)
        if self.consecutive_failures >= self.settings.consecutive_failures or (
            len(self.results) >= self.settings.min_samples
            and failures / len(self.results) >= self.settings.failure_ratio
        ):
            self._open(now)

    def release_probe(self) -> None:
        """A probe ended without a verdict (the client left): let another one through."""
        if self.state == self.HALF_OPEN:
            self.probe_in_flight = False

    def _open(self, now: float) -> None:
        self.state = self.OPEN
        self.open_until = now + self.backoff

    def _close(self) -> None:
        self.state = self.CLOSED
        self.results.clear()
        self.consecutive_failures = 0
        self.backoff = self.settings.backoff


class HealthRegistry:
    """Key pools and breakers for one loaded config; rebuilt when the config changes, which
    is also what brings disabled keys back."""

    def __init__(self, config: GatewayConfig, previous: "HealthRegistry | None" = None) -> None:
        self.pools = {c.name: KeyPool(c) for c in config.channels}
        # One breaker per channel URL: `breakers[name]` is the first URL's (the only one of
        # most channels), `url_breakers` hold those of a channel's other `base_urls`.
        self.breakers = {c.name: CircuitBreaker(config.breaker) for c in config.channels}
        self.url_breakers = {
            (c.name, url): CircuitBreaker(config.breaker) for c in config.channels for url in c.chat_urls[1:]
        }
        if previous is not None:
            self._carry_over(previous)

    def _carry_over(self, previous: "HealthRegistry") -> None:
        """Keep what a reload must not forget: cooldowns of keys still configured (an
        upstream's Retry-After stays true across an edit) and the breaker of a channel that
        still points at the same upstream. Disabled keys are not carried: a reload is how
        they come back."""
        for name, pool in self.pools.items():
            old_pool = previous.pools.get(name)
            if old_pool is not None:
                pool.limits.carry_over(old_pool.limits, old_pool.channel.api_keys, pool.channel.api_keys)
            if old_pool is None or old_pool.channel.base_url != pool.channel.base_url:
                continue
            cooling = {
                key: state.cooling_until
                for key, state in zip(old_pool.channel.api_keys, old_pool.states)
            }
            for key, state in zip(pool.channel.api_keys, pool.states):
                state.cooling_until = cooling.get(key, 0.0)
            old_breaker = previous.breakers[name]
            if old_breaker.settings == self.breakers[name].settings:
                # Shared, so results of requests still running on the old config count.
                self.breakers[name] = old_breaker
        for url_key in self.url_breakers.keys() & previous.url_breakers.keys():
            if previous.url_breakers[url_key].settings == self.url_breakers[url_key].settings:
                self.url_breakers[url_key] = previous.url_breakers[url_key]

    def breaker(self, channel: str, chat_url: str) -> CircuitBreaker:
        """The breaker of one of a channel's URLs (its chat completions URL)."""
        return self.url_breakers.get((channel, chat_url)) or self.breakers[channel]

    def snapshot(self, now: float) -> dict[str, dict]:
        """Non-secret health state per channel, for /health and `ccx.explain`."""
        out = {}
        for name, pool in self.pools.items():
            breaker = self.breakers[name]
            out[name] = {
                "circuit": breaker.state,
                "keys": [
                    {
                        "key": pool.channel.key_label(i),
                        "disabled": s.disabled or None,
                        "cooling_for_s": round(s.cooling_until - now, 1) if s.cooling_until > now else 0,
                    }
                    for i, s in enumerate(pool.states)
                ],
            }
            for i, key in enumerate(out[name]["keys"]):
                if why := pool.limits.blocked(i, now):
                    key["at_limit"] = why
            if len(pool.channel.urls) > 1:
                urls = {url: self.breaker(name, url).state for url in pool.channel.chat_urls}
                out[name]["urls"] = urls
                # The channel serves while any of its URLs does.
                out[name]["circuit"] = min(urls.values(), key=(CircuitBreaker.CLOSED, CircuitBreaker.HALF_OPEN, CircuitBreaker.OPEN).index)
        return out
