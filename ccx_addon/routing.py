"""Which channels may serve a model, and under which upstream name. Pure functions.

Matching is case-insensitive: `GPT-5` and `gpt-5` are the same model to the gateway.
"""

import dataclasses
from collections.abc import Mapping
from fnmatch import fnmatchcase

from .config import Channel, GatewayConfig

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def _matches(pattern: str, name: str) -> bool:
    return fnmatchcase(name.lower(), pattern.lower())


@dataclasses.dataclass(frozen=True)
class MappingResult:
    upstream_model: str
    rule: str | None  # the model_mapping key that applied, None when unchanged


def map_model(mapping: tuple[tuple[str, str], ...], model: str) -> MappingResult:
    """Exact key first; else the longest matching key (globs match the whole name, other
    keys match as a substring); ties go to the key written first; else unchanged."""
    lowered = model.lower()
    best: tuple[str, str] | None = None
    for key, target in mapping:
        key_lower = key.lower()
        if key_lower == lowered:
            return MappingResult(target, key)
        hit = _matches(key, model) if is_glob(key) else key_lower in lowered
        if hit and (best is None or len(key) > len(best[0])):
            best = (key, target)
    if best is None:
        return MappingResult(model, None)
    return MappingResult(best[1], best[0])


def check_allowlist(patterns: tuple[str, ...], names: tuple[str, ...]) -> str | None:
    """None when one of `names` is allowed, else why not. Excludes (`!pattern`) are checked
    first and win over any include; an allowlist with no includes allows everything else."""
    includes = []
    for pattern in patterns:
        if pattern.startswith("!"):
            excluded = pattern[1:]
            for name in names:
                if _matches(excluded, name):
                    return f"{name!r} is excluded by {pattern!r}"
        else:
            includes.append(pattern)
    if not includes:
        return None
    if any(_matches(p, name) for p in includes for name in names):
        return None
    checked = " or ".join(repr(n) for n in dict.fromkeys(names))
    return f"neither {checked} matches supported_models" if len(set(names)) > 1 else (
        f"{checked} does not match supported_models"
    )


@dataclasses.dataclass(frozen=True)
class Route:
    """A channel that may serve the request, and the model name it will be sent."""

    channel: Channel
    upstream_model: str
    rule: str | None


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    model: str
    routes: tuple[Route, ...]
    skipped: tuple[tuple[str, str], ...]  # (channel name, reason)

    def describe_skipped(self) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in self.skipped)


def route_for(channel: Channel, model: str) -> tuple[Route | None, str]:
    """The route over `channel` for `model`, or None and why the channel cannot serve it."""
    if not channel.enabled:
        return None, "disabled"
    if channel.inactive_reason:
        return None, channel.inactive_reason
    mapped = map_model(channel.model_mapping, model)
    if channel.supported_models:
        names = (model, mapped.upstream_model)
        if reason := check_allowlist(channel.supported_models, names):
            return None, reason
    return Route(channel, mapped.upstream_model, mapped.rule), ""


def plan_routes(config: GatewayConfig, model: str) -> RoutePlan:
    """Channels that admit `model`, in priority order. Fallback channels only come in when
    no regular channel admits the model."""
    regular: list[Route] = []
    fallback: list[Route] = []
    skipped: list[tuple[str, str]] = []
    for channel in config.channels:
        route, reason = route_for(channel, model)
        if route is None:
            skipped.append((channel.name, reason))
        elif channel.fallback:
            fallback.append(route)
        else:
            regular.append(route)
    if regular:
        skipped.extend(
            (r.channel.name, "fallback channel, not used while another channel serves this model")
            for r in fallback
        )
        return RoutePlan(model, tuple(regular), tuple(skipped))
    return RoutePlan(model, tuple(fallback), tuple(skipped))


def listed_models(config: GatewayConfig, upstream: Mapping[str, tuple[str, tuple[str, ...]]] = {}) -> list[str]:
    """Model names a client can ask for: exact allowlist entries and mapping keys of
    channels that can serve, and `upstream`'s lists (channel name -> (base URL, model
    ids), from the upstreams' own /models) of channels that opt in, within their allowlist."""
    names: dict[str, None] = {}
    for channel in config.channels:
        if not channel.active:
            continue
        base_url, fetched = upstream.get(channel.name, ("", ()))
        if channel.lists_upstream_models and base_url == channel.base_url:
            names.update((n, None) for n in fetched if route_for(channel, n)[0] is not None)
        for pattern in channel.supported_models:
            if not pattern.startswith("!") and not is_glob(pattern):
                names[pattern] = None
        for key, _ in channel.model_mapping:
            if not is_glob(key) and route_for(channel, key)[0] is not None:
                names[key] = None
    return sorted(names)


def pinned_plan(channel: Channel, model: str) -> RoutePlan:
    """One route over `channel` that sends `model` unchanged: a replayed flow already shows
    the request as its upstream received it (mapped model and all)."""
    return RoutePlan(model, (Route(channel, model, None),), ())
