"""The upstreams' own model lists for `/v1/models`, fetched in the background and cached.

A channel that opts in (`list_upstream_models`, on by default with a preset) has its
`GET {base_url}/models` fetched with one of its keys, every `ccx_models_refresh` seconds.
`/v1/models` reads only the cache, so it never waits for an upstream: before the first
fetch, or while an upstream does not answer, it lists what the config names.
"""

import asyncio
import dataclasses
import json
import logging
import time

from mitmproxy import ctx, exceptions

from .config import Channel
from .health import HealthRegistry
from .state import GatewayState
from .upstream import UpstreamClient, UpstreamError, upstream_request_headers

logger = logging.getLogger(__name__)

DEFAULT_REFRESH = 3600.0
# A failed fetch is tried again after this long (or the refresh interval, if shorter).
RETRY_AFTER_FAILURE = 60.0
# How often the loop looks for channels due (also notices reloads).
CHECK_INTERVAL = 1.0
FETCH_TIMEOUT = 30.0
# Bounds on what one upstream's list may hold.
MAX_LIST_BYTES = 4 * 1024 * 1024
MAX_NAMES = 5000
MAX_NAME_LENGTH = 200


def parse_model_list(body: bytes) -> tuple[str, ...] | None:
    """The model ids of an OpenAI-style `{"data": [{"id": ...}, ...]}` answer (bounded,
    printable names only), or None if it is not one."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        return None
    names: dict[str, None] = {}
    for entry in data:
        name = entry.get("id") if isinstance(entry, dict) else None
        if isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH and name.isprintable():
            names[name] = None
            if len(names) >= MAX_NAMES:
                break
    return tuple(names)


@dataclasses.dataclass
class CachedList:
    base_url: str  # the list belongs to this upstream: a reload that changes it refetches
    names: tuple[str, ...] = ()
    tried_at: float = 0.0
    ok: bool = False
    problem: str = ""


class ModelCatalog:
    """Keeps `state.upstream_models` (channel name -> model ids) fresh."""

    def __init__(self, state: GatewayState, client: UpstreamClient) -> None:
        self.state = state
        self.client = client
        self.cache: dict[str, CachedList] = {}
        self._loop_task: asyncio.Task | None = None
        self._fetches: dict[str, asyncio.Task] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_models_refresh", float, DEFAULT_REFRESH,
            "ccx-addon: seconds between fetches of an upstream's own GET /models list, for "
            "channels with list_upstream_models (on by default with a preset). 0 never fetches.",
        )

    def configure(self, updated) -> None:
        if "ccx_models_refresh" in updated and ctx.options.ccx_models_refresh < 0:
            raise exceptions.OptionsError("ccx_models_refresh: must be 0 (never fetch) or a number of seconds")

    def running(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def done(self) -> None:
        tasks = [t for t in (self._loop_task, *self._fetches.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop_task = None
        self._fetches.clear()

    async def _run(self) -> None:
        while True:
            refresh = ctx.options.ccx_models_refresh
            config, health = self.state.config, self.state.health
            if config is not None and forget_removed(self.cache, config.channels):
                self.publish()
            if refresh > 0 and config is not None and health is not None:
                for channel in due_channels(config.channels, self.cache, refresh, time.time()):
                    if channel.name not in self._fetches:
                        self._fetches[channel.name] = asyncio.ensure_future(self._refresh(channel, health))
            await asyncio.sleep(CHECK_INTERVAL)

    async def _refresh(self, channel: Channel, health: HealthRegistry) -> None:
        entry = self.cache.get(channel.name)
        if entry is None or entry.base_url != channel.base_url:
            entry = self.cache[channel.name] = CachedList(channel.base_url)
        entry.tried_at = time.time()
        try:
            names, problem = await self._fetch(channel, health)
            entry.ok = names is not None
            if names is not None:
                entry.names = names
            if problem != entry.problem and problem:
                logger.info(f"ccx: /v1/models: the model list of channel {channel.name!r} is unavailable: {problem}")
            entry.problem = problem
            self.publish()
        finally:
            self._fetches.pop(channel.name, None)

    async def _fetch(self, channel: Channel, health: HealthRegistry) -> tuple[tuple[str, ...] | None, str]:
        pool = health.pools.get(channel.name)
        usable = [i for i, s in enumerate(pool.states) if not s.disabled] if pool else []
        if not usable or not channel.api_keys:
            return None, "no usable key"
        headers = upstream_request_headers((), channel, channel.api_keys[usable[0]])
        try:
            status, body = await self.client.get(channel, channel.models_url, headers, FETCH_TIMEOUT, MAX_LIST_BYTES)
        except UpstreamError as e:
            return None, e.reason
        if status != 200:
            return None, f"HTTP {status}"
        names = parse_model_list(body)
        return (names, "") if names is not None else (None, "not an OpenAI-style model list")

    def publish(self) -> None:
        """Make the cache what `/v1/models` reads: one replaced dict, never a half-updated one."""
        self.state.upstream_models = {
            name: (entry.base_url, entry.names) for name, entry in self.cache.items() if entry.names
        }


def forget_removed(cache: dict[str, CachedList], channels) -> bool:
    """Drop the lists of channels a reload removed, so the cache stays as large as the
    config. Whether any was dropped."""
    removed = set(cache) - {c.name for c in channels}
    for name in removed:
        del cache[name]
    return bool(removed)


def due_channels(channels, cache: dict[str, CachedList], refresh: float, now: float) -> list[Channel]:
    """Channels whose list should be fetched now: opted in, active, and never fetched from
    this base URL, or fetched `refresh` ago (a failed fetch: after RETRY_AFTER_FAILURE)."""
    due = []
    for channel in channels:
        if not (channel.active and channel.lists_upstream_models):
            continue
        entry = cache.get(channel.name)
        if entry is None or entry.base_url != channel.base_url:
            due.append(channel)
            continue
        wait = refresh if entry.ok else min(refresh, RETRY_AFTER_FAILURE)
        if now - entry.tried_at >= wait:
            due.append(channel)
    return due
