"""Upstream health: per-key cooldowns and disables, per-channel circuit breakers.

Pure state machines driven by an explicit `now`, so tests step time instead of sleeping.
"""

import collections
import dataclasses
import hashlib

from .config import AffinitySettings, BreakerSettings, Channel, GatewayConfig
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

    def pick(
        self, now: float, tried: set[int], session: "SessionChoice | None" = None
    ) -> tuple[int | None, str]:
        """The next usable key index, or None and why none is usable. With a `session`, its
        bound key while that key is usable; otherwise the next key in rotation (by weight,
        skipping keys at their rpm/concurrency limit), which the session is then bound to
        (so new sessions spread over the pool)."""
        if session is not None and self.sticky:
            return self._pick_for_session(now, tried, session)
        if session is not None:
            session.note = ""
        return self._rotate(now, tried)

    def _rotate(self, now: float, tried: set[int]) -> tuple[int | None, str]:
        for index in self.limits.order(self._next):
            state = self.states[index]
            if index in tried or state.disabled or state.cooling_until > now or self.limits.blocked(index, now):
                continue
            self._next = self.limits.chosen(index)
            return index, ""
        return None, self.describe_unusable(now, tried)

    def _pick_for_session(self, now: float, tried: set[int], session: "SessionChoice") -> tuple[int | None, str]:
        name = self.channel.name
        bound = session.bound(name)
        why_left = ""
        if bound is not None and bound < len(self.states):
            why_left = self.unusable_because(bound, now, tried)
            if not why_left:
                session.note = f"→ {self.channel.key_label(bound)}"
                return bound, ""
        index, why_not = self._rotate(now, tried)
        if index is None:
            return None, why_not
        session.bind(name, index)
        label = self.channel.key_label(index)
        if why_left:
            session.note = f"→ {label} (moved from {self.channel.key_label(bound)}: {why_left})"
        else:
            session.note = f"→ {label} (new)"
        return index, ""

    @property
    def sticky(self) -> bool:
        """Whether sessions are bound to keys here: affinity on, and a choice to make."""
        return self.channel.session_affinity and len(self.states) > 1

    def unusable_because(self, index: int, now: float, tried: set[int]) -> str:
        """Why key `index` cannot take a request now, in a word or two; "" when it can."""
        state = self.states[index]
        if state.disabled:
            return "disabled"
        if state.cooling_until > now:
            return "cooling"
        if index in tried:
            return "failed"
        if self.limits.blocked(index, now):
            return "at its limit"
        return ""

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


class SessionBindings:
    """Which key each client session is bound to, per channel: session id -> {channel name:
    key index}. Bounded: a binding is forgotten `ttl` seconds after the session's last
    request, and beyond `max_sessions` the least recently used session goes first. The
    dict's order is the order of last use, so expired sessions are always at its front."""

    # Longer ids are stored as their SHA-256: a client-chosen header must not decide how much
    # memory one binding takes.
    MAX_ID_LENGTH = 128

    def __init__(self, settings: AffinitySettings) -> None:
        self.settings = settings
        self._sessions: collections.OrderedDict[str, _Session] = collections.OrderedDict()
        # Sessions per (channel, key index), kept as bindings change: counting 10,000
        # sessions for every /health call took ~7 ms.
        self._counts: collections.Counter[tuple[str, int]] = collections.Counter()

    def __len__(self) -> int:
        return len(self._sessions)

    def choice(self, session_id: str, now: float) -> "SessionChoice":
        """The binding of one request's session (created on its first bind)."""
        if len(session_id) > self.MAX_ID_LENGTH:
            session_id = "sha256:" + hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
        entry = self._sessions.get(session_id)
        if entry is not None:
            if now - entry.seen > self.settings.ttl:
                self._drop(self._sessions.pop(session_id))
                entry = None
            else:
                entry.seen = now
                self._sessions.move_to_end(session_id)
        return SessionChoice(self, session_id, entry, now)

    def _store(self, session_id: str, entry: "_Session") -> None:
        sessions = self._sessions
        sessions[session_id] = entry
        self._forget_old(entry.seen)

    def _forget_old(self, now: float) -> None:
        sessions, ttl = self._sessions, self.settings.ttl
        while len(sessions) > self.settings.max_sessions:
            self._drop(sessions.popitem(last=False)[1])
        while sessions:
            oldest = next(iter(sessions.values()))
            if now - oldest.seen <= ttl:
                break
            self._drop(sessions.popitem(last=False)[1])

    def _drop(self, entry: "_Session") -> None:
        for binding in entry.keys.items():
            self._counts[binding] -= 1

    def _bind(self, entry: "_Session", channel: str, index: int) -> None:
        old = entry.keys.get(channel)
        if old is not None:
            self._counts[(channel, old)] -= 1
        entry.keys[channel] = index
        self._counts[(channel, index)] += 1

    def counts(self) -> collections.Counter:
        """How many sessions each (channel, key index) holds."""
        return self._counts.copy()

    def carried_over(self, settings: AffinitySettings, pools: dict[str, KeyPool],
                     old_pools: dict[str, KeyPool]) -> "SessionBindings":
        """A copy for a reloaded config: bindings whose channel and key (the key itself, not
        its position) still exist, remapped to the new positions; least recently used first."""
        new = SessionBindings(settings)
        moved: dict[tuple[str, int], int] = {}
        for name, pool in pools.items():
            old_pool = old_pools.get(name)
            if old_pool is None or not pool.channel.api_keys:
                continue
            position = {key: i for i, key in enumerate(pool.channel.api_keys)}
            for old_index, key in enumerate(old_pool.channel.api_keys):
                if key in position:
                    moved[(name, old_index)] = position[key]
        for session_id, entry in self._sessions.items():
            keys = {c: moved[(c, i)] for c, i in entry.keys.items() if (c, i) in moved}
            if keys:
                new._sessions[session_id] = _Session(entry.seen, keys)
                new._counts.update(keys.items())
        new._forget_old(max((e.seen for e in new._sessions.values()), default=0.0))
        return new


class _Session:
    __slots__ = ("seen", "keys")

    def __init__(self, seen: float, keys: dict[str, int]) -> None:
        self.seen = seen
        self.keys = keys


class SessionChoice:
    """One request's view of its session's bindings. `note` says what the last key choice
    did, for the flow comment: `→ pool#2`, `→ pool#2 (new)`, `→ pool#3 (moved from pool#2:
    cooling)`."""

    __slots__ = ("store", "session_id", "entry", "now", "note")

    def __init__(self, store: SessionBindings, session_id: str, entry: _Session | None, now: float) -> None:
        self.store = store
        self.session_id = session_id
        self.entry = entry
        self.now = now
        self.note = ""

    def bound(self, channel: str) -> int | None:
        return None if self.entry is None else self.entry.keys.get(channel)

    def bind(self, channel: str, index: int) -> None:
        if self.entry is None:
            self.entry = _Session(self.now, {})
            self.store._store(self.session_id, self.entry)
        self.store._bind(self.entry, channel, index)


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
        self.sessions = SessionBindings(config.session_affinity)
        self.url_breakers = {
            (c.name, url): CircuitBreaker(config.breaker) for c in config.channels for url in c.chat_urls[1:]
        }
        if previous is not None:
            self._carry_over(previous)
            self.sessions = previous.sessions.carried_over(config.session_affinity, self.pools, previous.pools)

    def session_choice(self, session_id: str, now: float) -> SessionChoice | None:
        """The request's session binding, or None without a session id."""
        return self.sessions.choice(session_id, now) if session_id else None

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
        sessions = self.sessions.counts()
        for name, pool in self.pools.items():
            breaker = self.breakers[name]
            out[name] = {
                "circuit": breaker.state,
                "keys": [
                    {
                        "key": pool.channel.key_label(i),
                        "disabled": s.disabled or None,
                        "cooling_for_s": round(s.cooling_until - now, 1) if s.cooling_until > now else 0,
                        "sessions": sessions[(name, i)],
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
