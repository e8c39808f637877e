"""Per-key weights and limits (`api_keys` entries written as objects): which key a request
without a session gets, and whether a key may take one more request now.

Pure state driven by an explicit `now`, like health.py, so tests step time instead of
sleeping. Counts are per gateway process: several gateways each count their own.
"""

import collections

from .config import Channel

RPM_WINDOW = 60.0
# When a key waits for a request in flight to end, nobody knows when that is: the
# Retry-After a client gets for it.
CONCURRENCY_RETRY = 1.0


class KeyUsage:
    """What one key carries now. Shared across reloads (by key), so requests that started
    under the old config still count and release what they took."""

    __slots__ = ("started", "in_flight")

    def __init__(self, rpm: int | None) -> None:
        # Only the newest `rpm` start times matter: the oldest of them says when a slot frees.
        self.started: collections.deque[float] = collections.deque(maxlen=rpm or 1)
        self.in_flight = 0


class Lease:
    """One request's hold on a key, from the moment it is sent until its answer ends (a
    stream's last byte). Released once, however many times `release` is called."""

    __slots__ = ("usage",)

    def __init__(self, usage: KeyUsage) -> None:
        self.usage: KeyUsage | None = usage

    def release(self) -> None:
        if self.usage is not None:
            self.usage.in_flight -= 1
            self.usage = None


class KeyLimits:
    """A channel's key weights (smooth weighted round robin) and rpm/concurrency limits."""

    def __init__(self, channel: Channel, count: int) -> None:
        self.limits = [channel.limit_of(i) for i in range(count)]
        self.usage = [KeyUsage(limit.rpm) for limit in self.limits]
        self.weighted = any(limit.weight != 1 for limit in self.limits)
        self._current = [0] * count

    # ---- rotation ----
    def order(self, start: int) -> list[int]:
        """Key indexes in the order they are offered. Equal weights: round robin from
        `start`. Otherwise the smooth weighted rotation: each key's share of picks is its
        weight over the sum, spread out (3:1 gives a a b a, a a b a, ...)."""
        count = len(self.limits)
        if not self.weighted:
            return [(start + step) % count for step in range(count)]
        return sorted(range(count), key=lambda i: (-(self._current[i] + self.limits[i].weight), i))

    def chosen(self, index: int) -> int:
        """Note that `index` was picked; returns where a plain round robin starts next."""
        if self.weighted:
            for i, limit in enumerate(self.limits):
                self._current[i] += limit.weight
            self._current[index] -= sum(limit.weight for limit in self.limits)
        return (index + 1) % len(self.limits)

    # ---- limits ----
    def blocked(self, index: int, now: float) -> str:
        """Why key `index` may not take a request now ("" when it may)."""
        limit, usage = self.limits[index], self.usage[index]
        if limit.max_concurrency is not None and usage.in_flight >= limit.max_concurrency:
            return f"max_concurrency {limit.max_concurrency} reached ({usage.in_flight} in flight)"
        if limit.rpm is not None and self._rpm_free_at(index, now) > now:
            return f"rpm {limit.rpm} reached, a slot frees in {self._rpm_free_at(index, now) - now:.0f}s"
        return ""

    def free_at(self, index: int, now: float) -> float:
        """When key `index` may take a request again (`now` when it may now)."""
        limit, usage = self.limits[index], self.usage[index]
        at = now
        if limit.rpm is not None:
            at = max(at, self._rpm_free_at(index, now))
        if limit.max_concurrency is not None and usage.in_flight >= limit.max_concurrency:
            at = max(at, now + CONCURRENCY_RETRY)
        return at

    def _rpm_free_at(self, index: int, now: float) -> float:
        started = self.usage[index].started
        if len(started) < (self.limits[index].rpm or 0):
            return now
        return started[0] + RPM_WINDOW

    def acquire(self, index: int, now: float) -> Lease:
        """A request on key `index` starts now."""
        usage = self.usage[index]
        if self.limits[index].rpm is not None:
            usage.started.append(now)
        usage.in_flight += 1
        return Lease(usage)

    def carry_over(self, old: "KeyLimits", old_keys: tuple[str, ...], new_keys: tuple[str, ...]) -> None:
        """After a reload: keys still configured keep their counts (with the new limits)."""
        by_key = dict(zip(old_keys, old.usage))
        for index, key in enumerate(new_keys):
            if (usage := by_key.get(key)) is not None:
                rpm = self.limits[index].rpm
                if usage.started.maxlen != (rpm or 1):
                    usage.started = collections.deque(usage.started, maxlen=rpm or 1)
                self.usage[index] = usage
