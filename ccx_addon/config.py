"""Load and validate the gateway's YAML configuration.

Everything here is pure: `load_config(path, environ)` returns a `GatewayConfig` or raises
`ConfigError` with one message that names the file, the field path and the line. Secrets
(keys) never appear in a message: values are not quoted back, only their place.
"""

import base64
import dataclasses
import functools
import json
import os
import re
import urllib.request
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from .fixes import Clamp, FixSpec, Frozen
from .redact import SECRET_MASK

ECHO_BASE_URL = "echo:"
# Provider presets a channel can name (`preset:`): what each one fixes is decided in the
# presets and answer-classification code; the config only checks the name.
PRESET_NAMES = ("openai", "deepseek", "glm", "minimax", "kimi")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_CHANNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ConfigError(Exception):
    """A config file that cannot be used. The message is safe to print (no secrets)."""


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Seconds. `None` disables a limit."""

    connect: float = 10.0
    # Streaming requests: until the upstream starts the stream (sends response headers).
    response_headers: float = 300.0
    # Silence between two reads of a streamed body. Long generations are fine as long as
    # the upstream keeps sending events (or `: keep-alive` comments).
    idle: float = 120.0
    # Non-streaming requests: the whole exchange (their headers only come with the answer).
    total: float = 600.0


@dataclasses.dataclass(frozen=True)
class BreakerSettings:
    consecutive_failures: int = 5
    window: int = 10
    failure_ratio: float = 0.5
    min_samples: int = 5
    backoff: float = 5.0
    max_backoff: float = 300.0


PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")
DIRECT = "direct"  # proxy_url: direct: no proxy, whatever the environment says


@dataclasses.dataclass(frozen=True)
class Proxy:
    """The proxy a channel's upstream requests go through. `url` may hold credentials:
    show `display`, which masks the password."""

    url: str = dataclasses.field(repr=False)
    source: str = "proxy_url"  # or the environment variable it came from

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme.lower()

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0

    @property
    def address(self) -> str:
        """`host:port`, no credentials: how errors name the proxy."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def username(self) -> str:
        return unquote(urlsplit(self.url).username or "")

    @property
    def password(self) -> str:
        return unquote(urlsplit(self.url).password or "")

    @property
    def display(self) -> str:
        """`http://user:***@host:port`: never the password (nor a lone token as user)."""
        parts = urlsplit(self.url)
        if parts.password is not None:
            user = f"{parts.username}:***@"
        elif parts.username:
            user = "***@"
        else:
            user = ""
        return f"{self.scheme}://{user}{self.address}"

    @property
    def secrets(self) -> tuple[str, ...]:
        """The credential as it may appear anywhere: in the URL, decoded, and as the Basic
        authorization the proxy is sent."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return tuple(s for s in {parts.username or "", self.username} if s)
        basic = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return tuple(s for s in {parts.password, self.password, basic} if s)


@dataclasses.dataclass(frozen=True)
class AffinitySettings:
    """Session affinity: requests with a client session id stay on one key of a channel, so
    the provider's prompt cache (per account or key) keeps hitting."""

    enabled: bool = True
    # Seconds since a session's last request after which its binding is forgotten.
    ttl: float = 4 * 3600.0
    # Sessions remembered at most; the least recently used is forgotten first.
    max_sessions: int = 10_000


@dataclasses.dataclass(frozen=True)
class KeyLimit:
    """What one upstream key may carry (`api_keys` entries written as objects). Limits are
    counted by each gateway process on its own."""

    weight: int = 1  # share of the rotation for requests without a session
    rpm: int | None = None  # requests started in the last 60 s
    max_concurrency: int | None = None  # requests in flight, streams until their last byte

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.max_concurrency is not None

    def describe(self) -> str:
        parts = [f"weight {self.weight}"] if self.weight != 1 else []
        if self.rpm is not None:
            parts.append(f"rpm {self.rpm}")
        if self.max_concurrency is not None:
            parts.append(f"max_concurrency {self.max_concurrency}")
        return ", ".join(parts)


NO_LIMIT = KeyLimit()


@dataclasses.dataclass(frozen=True)
class Channel:
    name: str
    base_url: str
    api_keys: tuple[str, ...] = dataclasses.field(repr=False)
    priority: int = 0
    enabled: bool = True
    supported_models: tuple[str, ...] = ()
    model_mapping: tuple[tuple[str, str], ...] = ()
    # Only a candidate when no regular channel admits the model (e.g. the echo channel of
    # the default config, which must not catch failovers from real providers).
    fallback: bool = False
    auth_header: str = "bearer"  # or "x-api-key"
    headers: tuple[tuple[str, str], ...] = ()
    stream_usage: bool = False
    preset: str = ""  # one of PRESET_NAMES, or "" for none (only `model` changes)
    cooldown: float = 60.0
    # Keep a client session on one key (see AffinitySettings); the top-level setting unless
    # the channel overrides it.
    session_affinity: bool = True
    # The proxy upstream requests go through (from proxy_url or the environment), None for
    # a direct connection; `direct_because` says why a channel goes direct, for explain.
    proxy: Proxy | None = None
    direct_because: str = ""
    timeouts: Timeouts = Timeouts()
    # Why an enabled-looking channel cannot serve (e.g. its key env vars are all empty).
    inactive_reason: str = ""
    # Add the upstream's own GET /models list to /v1/models; None: on when a preset is set.
    list_upstream_models: bool | None = None
    # The channel's own request fixes, on top of its preset: (model globs, spec) layers,
    # "*" first for `fixes:` itself, then each `fixes.models` entry (see presets.resolve).
    fixes: tuple[tuple[str, FixSpec], ...] = ()
    # Every base URL when written as `base_urls` (base_url is then the first), tried in
    # order with the same key before the channel is given up.
    base_urls: tuple[str, ...] = ()
    # Per key, in the order of api_keys; empty: weight 1 and no limits for every key.
    key_limits: tuple[KeyLimit, ...] = ()
    # None: the top-level rewrite_response_model decides.
    rewrite_response_model: bool | None = None
    tls_verify: bool = True
    ca_file: str = ""  # an absolute path to PEM CA certificates trusted for this channel

    @property
    def urls(self) -> tuple[str, ...]:
        return self.base_urls or (self.base_url,)

    @property
    def chat_urls(self) -> tuple[str, ...]:
        return tuple(url.rstrip("/") + "/chat/completions" for url in self.urls)

    def limit_of(self, index: int) -> KeyLimit:
        return self.key_limits[index] if index < len(self.key_limits) else NO_LIMIT

    @property
    def is_echo(self) -> bool:
        return self.base_url == ECHO_BASE_URL

    @property
    def active(self) -> bool:
        return self.enabled and not self.inactive_reason

    @property
    def lists_upstream_models(self) -> bool:
        if self.is_echo:
            return False
        return bool(self.preset) if self.list_upstream_models is None else self.list_upstream_models

    @property
    def models_url(self) -> str:
        return self.base_url.rstrip("/") + "/models"

    @property
    def chat_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def key_label(self, index: int) -> str:
        """A non-secret name for one of the channel's keys."""
        return f"{self.name}#{index + 1}"


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    source: str
    proxy_access_keys: tuple[str, ...] = dataclasses.field(repr=False)
    channels: tuple[Channel, ...] = ()
    breaker: BreakerSettings = BreakerSettings()
    max_attempts: int = 5
    session_affinity: AffinitySettings = AffinitySettings()
    # Channels without proxy_url follow HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY.
    trust_env: bool = True
    rewrite_response_model: bool = False

    def rewrites_model(self, channel: Channel) -> bool:
        """Whether answers of `channel` name the model the client asked for."""
        if channel.rewrite_response_model is not None:
            return channel.rewrite_response_model
        return self.rewrite_response_model

    @functools.cached_property
    def secrets(self) -> tuple[str, ...]:
        """Every key this config holds, for scrubbing text that leaves the gateway. Cached:
        the config is immutable and this is read several times per request."""
        keys = list(self.proxy_access_keys)
        for channel in self.channels:
            keys.extend(channel.api_keys)
            keys.extend(channel_secrets(channel))
            if channel.proxy is not None:
                keys.extend(channel.proxy.secrets)
        # Longest first: a secret that contains another is masked whole.
        return tuple(sorted({k for k in keys if k}, key=len, reverse=True))


# Channel header values (and base_url passwords) shorter than this are not treated as
# secrets: masking "1" or "true" everywhere would mangle answers, and no key is that short.
MIN_HEADER_SECRET = 8
# Channel headers whose values are clearly not credentials (everything else a user puts in
# `channels[].headers`, such as `api-key`, is treated as one).
NOT_SECRET_HEADERS = frozenset({
    "accept", "content-type", "user-agent", "referer", "http-referer", "x-title",
    "openai-beta", "anthropic-version",
})


def channel_secrets(channel: "Channel") -> list[str]:
    """A channel's secrets besides its api_keys: header values (unless clearly not secret)
    and the credentials written into base_url (`https://user:KEY@host`), also in the
    Basic form a client library may send them in."""
    found = [
        value for name, value in channel.headers
        if name.lower() not in NOT_SECRET_HEADERS and len(value.strip()) >= MIN_HEADER_SECRET
    ]
    parts = urlsplit(channel.base_url)
    if parts.username or parts.password:
        # The password; or, without one, the user name (`https://TOKEN@host`).
        credential = parts.password or parts.username
        if len(unquote(credential)) >= MIN_HEADER_SECRET:
            found += [credential, unquote(credential)]
        basic = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        found.append(base64.b64encode(basic.encode()).decode())
    return found


def url_without_credentials(url: str) -> str:
    """`url` with any `user:password@` replaced by the mask, for showing it."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{SECRET_MASK}@{host}").geturl()


# --- YAML with line numbers -------------------------------------------------------------


class _Located:
    """A parsed value plus where it came from, so that validation can point at a line."""

    __slots__ = ("value", "line")

    def __init__(self, value: Any, line: int) -> None:
        self.value = value
        self.line = line


def _compose(text: str, source: str) -> _Located:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(f"{source}: the file is empty")
        return _to_located(loader, node, source)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f", line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{line}: invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def _to_located(loader: yaml.SafeLoader, node: yaml.Node, source: str) -> _Located:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[str, _Located] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise ConfigError(
                    f"{source}, line {key_node.start_mark.line + 1}: keys must be strings"
                )
            if key in result:
                raise ConfigError(
                    f"{source}, line {key_node.start_mark.line + 1}: duplicate key {key!r}"
                )
            result[key] = _to_located(loader, value_node, source)
        return _Located(result, line)
    if isinstance(node, yaml.SequenceNode):
        return _Located([_to_located(loader, n, source) for n in node.value], line)
    return _Located(loader.construct_object(node, deep=True), line)


# --- environment references ----------------------------------------------------------------


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Replace `${VAR}` and `${VAR:-default}`. A missing VAR without default raises KeyError(VAR)."""

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise KeyError(name)
            return default
        return value

    return _ENV_REF.sub(replace, text)


# --- validation ------------------------------------------------------------------------------


class _Validator:
    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ

    def fail(self, path: str, item: _Located, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}, line {item.line}, {path}: {problem}")

    def mapping(self, path: str, item: _Located, allowed: set[str]) -> dict[str, _Located]:
        if not isinstance(item.value, dict):
            raise self.fail(path, item, f"must be a mapping, not {_kind(item.value)}")
        unknown = sorted(set(item.value) - allowed)
        if unknown:
            field = unknown[0]
            raise self.fail(
                f"{path}.{field}" if path else field,
                item.value[field],
                f"unknown field (expected one of: {', '.join(sorted(allowed))})",
            )
        return item.value

    def string(self, path: str, item: _Located, *, secret: bool = False) -> str:
        if not isinstance(item.value, str):
            hint = ""
            if isinstance(item.value, (bool, int, float)) and not secret:
                # YAML reads bare on/off/yes/no as booleans and 0123 as numbers.
                hint = " (put the value in quotes to make it a string)"
            raise self.fail(path, item, f"must be a string, not {_kind(item.value)}{hint}")
        try:
            return expand_env(item.value, self.environ)
        except KeyError as e:
            hint = "" if secret else " (or write ${VAR:-default})"
            raise self.fail(
                path, item, f"environment variable {e.args[0]} is not set{hint}"
            ) from None

    def string_list(self, path: str, item: _Located, *, secret: bool = False) -> list[str]:
        if isinstance(item.value, str):
            raise self.fail(path, item, "must be a list of strings (write [\"...\"])")
        if not isinstance(item.value, list):
            raise self.fail(path, item, f"must be a list, not {_kind(item.value)}")
        return [
            self.string(f"{path}[{i}]", sub, secret=secret) for i, sub in enumerate(item.value)
        ]

    def string_map(self, path: str, item: _Located) -> tuple[tuple[str, str], ...]:
        if not isinstance(item.value, dict):
            raise self.fail(path, item, f"must be a mapping, not {_kind(item.value)}")
        pairs = []
        for key, sub in item.value.items():
            if not key:
                raise self.fail(path, sub, "keys must not be empty")
            pairs.append((key, self.string(f"{path}.{key}", sub)))
        return tuple(pairs)

    def boolean(self, path: str, item: _Located) -> bool:
        value = item.value
        if isinstance(value, str):
            value = expand_env(value, self.environ).strip().lower()
            if value in ("true", "yes", "on", "1"):
                return True
            if value in ("false", "no", "off", "0", ""):
                return False
        if not isinstance(value, bool):
            raise self.fail(path, item, f"must be true or false, not {_kind(item.value)}")
        return value

    def number(
        self, path: str, item: _Located, *, integer: bool = False, minimum: float = 0,
        allow_none: bool = False,
    ) -> Any:
        value = item.value
        if value is None and allow_none:
            return None
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            kind = "a whole number" if integer else "a number"
            raise self.fail(path, item, f"must be {kind}, not {_kind(value)}")
        if value < minimum:
            raise self.fail(path, item, f"must be at least {minimum}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)


def check_base_url(url: str) -> str | None:
    """Why `url` cannot be a channel base URL, or None when it can."""
    if url == ECHO_BASE_URL:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https:// (or be echo:)"
    if not parts.hostname:
        return "has no host"
    try:
        parts.port
    except ValueError:
        return "has an invalid port"
    if parts.query or parts.fragment:
        return "must not contain a query or fragment"
    if parts.path.rstrip("/").endswith("/chat/completions"):
        return "must be the API root (e.g. https://api.openai.com/v1), not the /chat/completions endpoint"
    return None


_TOP_FIELDS = {
    "proxy_access_keys", "channels", "circuit_breaker", "max_attempts", "$schema", "session_affinity",
    "trust_env", "rewrite_response_model",
}
_CHANNEL_FIELDS = {
    "name", "base_url", "api_keys", "priority", "enabled", "supported_models",
    "model_mapping", "fallback", "auth_header", "headers", "stream_usage", "cooldown",
    "timeouts", "preset", "list_upstream_models", "fixes", "session_affinity", "proxy_url",
    "base_urls", "rewrite_response_model", "tls_verify", "ca_file",
}
_KEY_FIELDS = {"key", "weight", "rpm", "max_concurrency"}
_TIMEOUT_FIELDS = {f.name for f in dataclasses.fields(Timeouts)}
_BREAKER_FIELDS = {f.name for f in dataclasses.fields(BreakerSettings)}
_AFFINITY_FIELDS = {f.name for f in dataclasses.fields(AffinitySettings)}


def _proxy_access_keys(check, top, environ: Mapping[str, str], source: str) -> list[str]:
    """The keys clients must present. Clients' keys are compared stripped, so a key with
    nothing but whitespace (or one left empty) would lock every client out: refused."""
    if "proxy_access_keys" in top:
        keys = check.string_list("proxy_access_keys", top["proxy_access_keys"], secret=True)
        if any(k and not k.strip() for k in keys):
            raise check.fail("proxy_access_keys", top["proxy_access_keys"],
                             "a key is only whitespace, which no client can present")
        keys = [k.strip() for k in keys if k]
        if not keys:
            raise check.fail(
                "proxy_access_keys", top["proxy_access_keys"],
                "no key left after expanding environment variables (set PROXY_ACCESS_KEY)",
            )
        return keys
    env_key = environ.get("PROXY_ACCESS_KEY", "")
    if not env_key.strip():
        raise ConfigError(
            f"{source}: no proxy access key: set the environment variable PROXY_ACCESS_KEY "
            + ("to something other than whitespace " if env_key else "")
            + "or the proxy_access_keys field"
        )
    return [env_key.strip()]


def parse_config(
    text: str, source: str = "<config>", environ: Mapping[str, str] | None = None
) -> GatewayConfig:
    environ = os.environ if environ is None else environ
    check = _Validator(source, environ)
    root = _compose(text, source)
    top = check.mapping("", root, _TOP_FIELDS)

    access_keys = _proxy_access_keys(check, top, environ, source)

    if "channels" not in top:
        raise check.fail("channels", root, "missing: list at least one channel")
    channel_items = top["channels"]
    if not isinstance(channel_items.value, list) or not channel_items.value:
        raise check.fail("channels", channel_items, "must be a non-empty list of channels")

    channels = []
    seen: dict[str, int] = {}
    for index, item in enumerate(channel_items.value):
        channel = _parse_channel(check, f"channels[{index}]", item, index)
        if channel.name in seen:
            raise check.fail(
                f"channels[{index}].name", item.value["name"],
                f"duplicate channel name {channel.name!r} (first at channels[{seen[channel.name]}])",
            )
        seen[channel.name] = index
        channels.append(channel)

    breaker = BreakerSettings()
    if "circuit_breaker" in top:
        fields = check.mapping("circuit_breaker", top["circuit_breaker"], _BREAKER_FIELDS)
        values = {}
        for name, sub in fields.items():
            integer = name in ("consecutive_failures", "window", "min_samples")
            values[name] = check.number(f"circuit_breaker.{name}", sub, integer=integer, minimum=1 if integer else 0)
        breaker = dataclasses.replace(breaker, **values)
        if breaker.failure_ratio > 1:
            raise check.fail("circuit_breaker.failure_ratio", fields["failure_ratio"], "must be between 0 and 1")

    max_attempts = 5
    if "max_attempts" in top:
        max_attempts = check.number("max_attempts", top["max_attempts"], integer=True, minimum=1)

    affinity = _parse_affinity(check, top.get("session_affinity"))
    channels = _apply_affinity(check, channel_items, channels, affinity)
    trust_env = check.boolean("trust_env", top["trust_env"]) if "trust_env" in top else True
    channels = _apply_proxies(check, channel_items, channels, environ if trust_env else None)
    rewrite = False
    if "rewrite_response_model" in top:
        rewrite = check.boolean("rewrite_response_model", top["rewrite_response_model"])

    return GatewayConfig(
        source=source,
        proxy_access_keys=tuple(access_keys),
        channels=tuple(sorted(channels, key=lambda c: c.priority)),
        breaker=breaker,
        max_attempts=max_attempts,
        session_affinity=affinity,
        trust_env=trust_env,
        rewrite_response_model=rewrite,
    )


def _parse_affinity(check: _Validator, item: _Located | None) -> AffinitySettings:
    """Top-level `session_affinity`: true/false, or a mapping with `enabled`, `ttl` (seconds)
    and `max_sessions`."""
    if item is None:
        return AffinitySettings()
    if not isinstance(item.value, dict):
        return AffinitySettings(enabled=check.boolean("session_affinity", item))
    fields = check.mapping("session_affinity", item, _AFFINITY_FIELDS)
    values: dict[str, Any] = {}
    if "enabled" in fields:
        values["enabled"] = check.boolean("session_affinity.enabled", fields["enabled"])
    if "ttl" in fields:
        values["ttl"] = check.number("session_affinity.ttl", fields["ttl"], minimum=1)
    if "max_sessions" in fields:
        values["max_sessions"] = check.number(
            "session_affinity.max_sessions", fields["max_sessions"], integer=True, minimum=1)
    return AffinitySettings(**values)


def _apply_affinity(
    check: _Validator, items: _Located, channels: list[Channel], affinity: AffinitySettings
) -> list[Channel]:
    """Each channel's `session_affinity` (true/false) overrides the top-level setting."""
    resolved = []
    for index, (item, channel) in enumerate(zip(items.value, channels)):
        own = item.value.get("session_affinity")
        enabled = affinity.enabled if own is None else check.boolean(
            f"channels[{index}].session_affinity", own)
        resolved.append(dataclasses.replace(channel, session_affinity=enabled))
    return resolved


def _parse_channel(check: _Validator, path: str, item: _Located, index: int) -> Channel:
    fields = check.mapping(path, item, _CHANNEL_FIELDS)
    if "name" not in fields:
        raise check.fail(path, item, "missing required field 'name'")

    name = check.string(f"{path}.name", fields["name"])
    if not _CHANNEL_NAME.match(name):
        raise check.fail(
            f"{path}.name", fields["name"],
            "must start with a letter or digit and use only letters, digits, _ . -",
        )
    base_urls = _parse_base_urls(check, path, item, fields)
    base_url = base_urls[0]

    inactive_reason = ""
    api_keys: list[str] = []
    key_limits: list[KeyLimit] = []
    if base_url != ECHO_BASE_URL:
        if "api_keys" not in fields:
            raise check.fail(path, item, "missing required field 'api_keys'")
        api_keys, key_limits = _parse_api_keys(check, f"{path}.api_keys", fields["api_keys"])
        if not api_keys:
            # Keys written as ${VAR:-} with VAR unset: the channel stays configured but idle,
            # which is how the default config offers providers the user has no key for yet.
            inactive_reason = "no API key set (every entry of api_keys expanded to empty)"
    elif "api_keys" in fields:
        raise check.fail(f"{path}.api_keys", fields["api_keys"], "the echo: channel takes no keys")

    channel = Channel(
        name=name,
        base_url=base_url,
        api_keys=tuple(api_keys),
        priority=index,
        inactive_reason=inactive_reason,
        base_urls=tuple(base_urls) if "base_urls" in fields else (),
        key_limits=tuple(key_limits) if any(k != NO_LIMIT for k in key_limits) else (),
    )
    changes: dict[str, Any] = {}
    if "priority" in fields:
        changes["priority"] = check.number(f"{path}.priority", fields["priority"], integer=True, minimum=-(10**9))
    for flag in ("enabled", "fallback", "stream_usage"):
        if flag in fields:
            changes[flag] = check.boolean(f"{path}.{flag}", fields[flag])
    if "supported_models" in fields:
        patterns = check.string_list(f"{path}.supported_models", fields["supported_models"])
        for i, pattern in enumerate(patterns):
            if not pattern.lstrip("!"):
                raise check.fail(f"{path}.supported_models[{i}]", fields["supported_models"].value[i], "empty pattern")
        changes["supported_models"] = tuple(patterns)
    if "model_mapping" in fields:
        changes["model_mapping"] = check.string_map(f"{path}.model_mapping", fields["model_mapping"])
        for key, target in changes["model_mapping"]:
            if not target:
                raise check.fail(f"{path}.model_mapping.{key}", fields["model_mapping"].value[key], "maps to an empty model name")
    if "auth_header" in fields:
        auth = check.string(f"{path}.auth_header", fields["auth_header"]).lower()
        if auth not in ("bearer", "x-api-key"):
            raise check.fail(f"{path}.auth_header", fields["auth_header"], "must be bearer or x-api-key")
        changes["auth_header"] = auth
    if "headers" in fields:
        headers = check.string_map(f"{path}.headers", fields["headers"])
        for key, _ in headers:
            if key.lower() in ("authorization", "x-api-key", "host", "content-length"):
                raise check.fail(f"{path}.headers.{key}", fields["headers"].value[key], "is set by the gateway and cannot be overridden")
        changes["headers"] = headers
    if "preset" in fields:
        preset = check.string(f"{path}.preset", fields["preset"]).strip().lower()
        if preset not in PRESET_NAMES + ("none", ""):
            raise check.fail(f"{path}.preset", fields["preset"], f"unknown preset (expected one of: {', '.join(PRESET_NAMES)}, none)")
        changes["preset"] = "" if preset == "none" else preset
    changes.update(_parse_model_listing(check, path, fields, base_url))
    if "fixes" in fields:
        changes["fixes"] = _parse_fixes(check, f"{path}.fixes", fields["fixes"])
    changes.update(_parse_tls(check, path, fields, base_urls))
    if "rewrite_response_model" in fields:
        changes["rewrite_response_model"] = check.boolean(f"{path}.rewrite_response_model", fields["rewrite_response_model"])
    if "cooldown" in fields:
        changes["cooldown"] = check.number(f"{path}.cooldown", fields["cooldown"])
    if "timeouts" in fields:
        sub = check.mapping(f"{path}.timeouts", fields["timeouts"], _TIMEOUT_FIELDS)
        values = {
            name: check.number(f"{path}.timeouts.{name}", value, allow_none=True)
            for name, value in sub.items()
        }
        changes["timeouts"] = dataclasses.replace(Timeouts(), **values)
    return dataclasses.replace(channel, **changes)


def _parse_model_listing(check: _Validator, path: str, fields: dict[str, _Located], base_url: str) -> dict[str, Any]:
    """`list_upstream_models`: whether /v1/models includes the upstream's own model list."""
    if "list_upstream_models" not in fields:
        return {}
    item = fields["list_upstream_models"]
    value = check.boolean(f"{path}.list_upstream_models", item)
    if value and base_url == ECHO_BASE_URL:
        raise check.fail(f"{path}.list_upstream_models", item, "the echo: channel has no upstream model list")
    return {"list_upstream_models": value}
# --- request fixes (`fixes:` of a channel) ---------------------------------------------------

_FIX_FIELDS = {
    "drop_params", "drop_unless", "rename_params", "set_params", "default_params", "clamp",
    "value_map", "role_map", "merge_system_messages", "ensure_user_turn", "flatten_content",
    "function_tools_only", "json_schema_to_json_object", "tool_parameters", "images",
    "reasoning_passback",
}
_FIXES_FIELDS = _FIX_FIELDS | {"models"}
_CLAMP_FIELDS = {"min", "max"}
_PASSBACK_FIELDS = {"scope", "placeholder"}
_PASSBACK_SCOPES = ("all", "tool_calls", "off")
_ROLES = ("system", "developer", "user", "assistant", "tool")


def _plain(item: _Located) -> Any:
    """A YAML value without line numbers (for values sent upstream as they are)."""
    value = item.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json_value(path: str, check: _Validator, item: _Located) -> Any:
    """A value to put in a body: scalars as they are, objects and arrays frozen (fixes.Frozen)."""
    value = _plain(item)
    if isinstance(value, (dict, list)):
        try:
            return Frozen(json.dumps(value, ensure_ascii=False, sort_keys=False))
        except (TypeError, ValueError):
            raise check.fail(path, item, "must be a JSON value (no dates or other YAML types)") from None
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise check.fail(path, item, "must be a JSON value (no dates or other YAML types)")
    return value


def _parse_fixes(check: _Validator, path: str, item: _Located) -> tuple[tuple[str, FixSpec], ...]:
    """`fixes:` of a channel: its own layer ("*"), then one per `models` glob, in file order."""
    fields = check.mapping(path, item, _FIXES_FIELDS)
    layers = [("*", _parse_fix_spec(check, path, item, fields))]
    if "models" in fields:
        models = fields["models"]
        if not isinstance(models.value, dict):
            raise check.fail(f"{path}.models", models, "must be a mapping of model glob to fixes")
        for glob, sub in models.value.items():
            if not glob.strip():
                raise check.fail(f"{path}.models", sub, "model globs must not be empty")
            sub_fields = check.mapping(f"{path}.models.{glob}", sub, _FIX_FIELDS)
            layers.append((glob, _parse_fix_spec(check, f"{path}.models.{glob}", sub, sub_fields)))
    return tuple(layers)


def _parse_fix_spec(check: _Validator, path: str, item: _Located, fields: dict[str, _Located]) -> FixSpec:
    spec: dict[str, Any] = {}

    def names(name: str) -> tuple[str, ...]:
        values = check.string_list(f"{path}.{name}", fields[name])
        if not all(values):
            raise check.fail(f"{path}.{name}", fields[name], "names must not be empty")
        return tuple(values)

    def values(name: str) -> tuple[tuple[str, Any], ...]:
        sub = fields[name]
        if not isinstance(sub.value, dict):
            raise check.fail(f"{path}.{name}", sub, f"must be a mapping, not {_kind(sub.value)}")
        return tuple((k, _json_value(f"{path}.{name}.{k}", check, v)) for k, v in sub.value.items())

    if "drop_params" in fields:
        spec["drop_params"] = names("drop_params")
    for name in ("drop_unless", "set_params", "default_params"):
        if name in fields:
            spec[name] = values(name)
    for name in ("rename_params", "role_map"):
        if name in fields:
            spec[name] = check.string_map(f"{path}.{name}", fields[name])
            if any(not v for _, v in spec[name]):
                raise check.fail(f"{path}.{name}", fields[name], "targets must not be empty")
    if "role_map" in fields:
        for old, new in spec["role_map"]:
            if new not in _ROLES:
                raise check.fail(f"{path}.role_map.{old}", fields["role_map"].value[old],
                                 f"unknown role {new!r} (expected one of: {', '.join(_ROLES)})")
    if "clamp" in fields:
        spec["clamp"] = _parse_clamps(check, f"{path}.clamp", fields["clamp"])
    if "value_map" in fields:
        sub = fields["value_map"]
        if not isinstance(sub.value, dict):
            raise check.fail(f"{path}.value_map", sub, "must map a parameter to {from: to}")
        maps = []
        for param, table in sub.value.items():
            if not isinstance(table.value, dict):
                raise check.fail(f"{path}.value_map.{param}", table, "must be a mapping {from: to} (to: null drops it)")
            maps.append((param, tuple(
                (k, _json_value(f"{path}.value_map.{param}.{k}", check, v)) for k, v in table.value.items())))
        spec["value_map"] = tuple(maps)
    for flag in ("merge_system_messages", "ensure_user_turn", "function_tools_only",
                 "json_schema_to_json_object", "tool_parameters", "images"):
        if flag in fields:
            spec[flag] = check.boolean(f"{path}.{flag}", fields[flag])
    if "flatten_content" in fields:
        spec["flatten_content"] = names("flatten_content")
    if "reasoning_passback" in fields:
        sub = check.mapping(f"{path}.reasoning_passback", fields["reasoning_passback"], _PASSBACK_FIELDS)
        if "scope" in sub:
            scope = check.string(f"{path}.reasoning_passback.scope", sub["scope"])
            if scope not in _PASSBACK_SCOPES:
                raise check.fail(f"{path}.reasoning_passback.scope", sub["scope"],
                                 f"must be one of: {', '.join(_PASSBACK_SCOPES)}")
            spec["reasoning_passback"] = scope
        if "placeholder" in sub:
            if sub["placeholder"].value is not None:
                spec["reasoning_placeholder"] = check.string(f"{path}.reasoning_passback.placeholder", sub["placeholder"])
    return FixSpec(**spec)


def _parse_clamps(check: _Validator, path: str, item: _Located) -> tuple[tuple[str, Clamp], ...]:
    if not isinstance(item.value, dict):
        raise check.fail(path, item, "must map a parameter to {min: N, max: N}")
    clamps = []
    for param, sub in item.value.items():
        bounds = check.mapping(f"{path}.{param}", sub, _CLAMP_FIELDS)
        if not bounds:
            raise check.fail(f"{path}.{param}", sub, "give min, max or both")
        low, high = (
            check.number(f"{path}.{param}.{b}", bounds[b], minimum=float("-inf")) if b in bounds else None
            for b in ("min", "max")
        )
        if low is not None and high is not None and low > high:
            raise check.fail(f"{path}.{param}", sub, "min is larger than max")
        clamps.append((param, Clamp(low, high)))
    return tuple(clamps)


# --- upstream proxies ----------------------------------------------------------------------


def check_proxy_url(url: str) -> str | None:
    """Why `url` cannot be a proxy URL, or None when it can. Never quotes the URL."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in PROXY_SCHEMES:
        return "must start with http://, https://, socks5:// or socks5h:// (or be direct)"
    if not parts.hostname:
        return "has no host"
    try:
        port = parts.port
    except ValueError:
        return "has an invalid port"
    if port is None:
        return "has no port (write scheme://host:port)"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return "must be scheme://[user:password@]host:port, without a path"
    return None


def environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """`*_proxy` variables as urllib.request.getproxies_environment reads them (lower case
    wins over upper case), from `environ` instead of the process environment."""
    proxies: dict[str, str] = {}
    for name, value in environ.items():
        if value and name.lower().endswith("_proxy"):
            proxies[name.lower()[:-6]] = value
    if "REQUEST_METHOD" in environ:  # CGI: HTTP_PROXY may come from a request header
        proxies.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            if value:
                proxies[name[:-6]] = value
            else:
                proxies.pop(name[:-6], None)
    return proxies


def _env_name(environ: Mapping[str, str], kind: str) -> str:
    """The variable a proxy setting came from, as written (https_proxy or HTTPS_PROXY)."""
    lower = f"{kind}_proxy"
    return lower if environ.get(lower) else lower.upper()


def resolve_proxy(
    base_url: str, proxy_url: str | None, environ: Mapping[str, str] | None
) -> tuple[Proxy | None, str]:
    """The proxy for a channel and, when there is none, why. `proxy_url` wins (`direct`
    forces no proxy); else, with `environ` (trust_env), the scheme's *_PROXY, then
    ALL_PROXY, unless NO_PROXY names the host (urllib's rules). ValueError names a broken
    environment variable."""
    if proxy_url == DIRECT:
        return None, "proxy_url: direct"
    if proxy_url:
        return Proxy(proxy_url), ""
    if environ is None:
        return None, "trust_env: false"
    proxies = environment_proxies(environ)
    upstream = urlsplit(base_url)
    for kind in (upstream.scheme, "all"):
        if url := proxies.get(kind, "").strip():
            break
    else:
        return None, ""
    host = upstream.hostname or ""
    if "no" in proxies and urllib.request.proxy_bypass_environment(
        f"{host}:{upstream.port}" if upstream.port else host, proxies
    ):
        return None, f"{_env_name(environ, 'no')} matches {host}"
    if "://" not in url:
        url = "http://" + url  # as requests and curl read HTTPS_PROXY=host:port
    name = _env_name(environ, kind)
    if problem := check_proxy_url(url):
        raise ValueError(f"environment variable {name} (the proxy for {host}) {problem}")
    return Proxy(url, name), ""


def _apply_proxies(
    check: _Validator, items: _Located, channels: list[Channel], environ: Mapping[str, str] | None
) -> list[Channel]:
    """Each channel's `proxy_url`, or the proxy environment (None with trust_env: false)."""
    resolved = []
    for index, (item, channel) in enumerate(zip(items.value, channels)):
        path, written = f"channels[{index}].proxy_url", item.value.get("proxy_url")
        proxy_url = None
        if written is not None:
            proxy_url = check.string(path, written, secret=True).strip() or None
            if channel.is_echo and proxy_url:
                raise check.fail(path, written, "the echo: channel takes no proxy")
            if proxy_url and proxy_url != DIRECT and (problem := check_proxy_url(proxy_url)):
                raise check.fail(path, written, problem)
        if channel.is_echo:
            resolved.append(channel)
            continue
        try:
            proxy, because = resolve_proxy(channel.base_url, proxy_url, environ)
        except ValueError as e:
            raise check.fail(f"channels[{index}]", item, f"{e} (or set proxy_url, or trust_env: false)") from None
        resolved.append(dataclasses.replace(channel, proxy=proxy, direct_because=because))
    return resolved


def _parse_base_urls(check: _Validator, path: str, item: _Located, fields: dict[str, _Located]) -> list[str]:
    """`base_url`, or `base_urls` (one or more, tried in order): exactly one of the two."""
    if "base_url" in fields and "base_urls" in fields:
        raise check.fail(f"{path}.base_urls", fields["base_urls"], "write either base_url or base_urls, not both")
    if "base_url" in fields:
        written = [(f"{path}.base_url", fields["base_url"], check.string(f"{path}.base_url", fields["base_url"]))]
    elif "base_urls" in fields:
        urls_item = fields["base_urls"]
        values = check.string_list(f"{path}.base_urls", urls_item)
        if not values:
            raise check.fail(f"{path}.base_urls", urls_item, "must list at least one URL")
        written = [(f"{path}.base_urls[{i}]", urls_item.value[i], v) for i, v in enumerate(values)]
    else:
        raise check.fail(path, item, "missing required field 'base_url' (or 'base_urls')")
    urls: list[str] = []
    for where, sub, url in written:
        url = url.strip()
        if problem := check_base_url(url):
            raise check.fail(where, sub, problem)
        if url == ECHO_BASE_URL and len(written) > 1:
            raise check.fail(where, sub, "the echo: channel has no other URLs")
        if url.rstrip("/") in (u.rstrip("/") for u in urls):
            raise check.fail(where, sub, "the same URL twice")
        urls.append(url)
    return urls


def _parse_api_keys(check: _Validator, path: str, item: _Located) -> tuple[list[str], list[KeyLimit]]:
    """`api_keys`: strings, or objects {key, weight, rpm, max_concurrency}. Entries that
    expand to empty are dropped with their limits."""
    if isinstance(item.value, str):
        raise check.fail(path, item, "must be a list of keys (write [\"...\"])")
    if not isinstance(item.value, list):
        raise check.fail(path, item, f"must be a list, not {_kind(item.value)}")
    if not item.value:
        raise check.fail(path, item, "must list at least one key")
    keys, limits = [], []
    for i, entry in enumerate(item.value):
        where = f"{path}[{i}]"
        if isinstance(entry.value, dict):
            fields = check.mapping(where, entry, _KEY_FIELDS)
            if "key" not in fields:
                raise check.fail(where, entry, "missing required field 'key'")
            key = check.string(f"{where}.key", fields["key"], secret=True).strip()
            limit = KeyLimit(**{
                name: check.number(f"{where}.{name}", fields[name], integer=True, minimum=1)
                for name in ("weight", "rpm", "max_concurrency") if name in fields
            })
        else:
            key, limit = check.string(where, entry, secret=True).strip(), NO_LIMIT
        if key:
            keys.append(key)
            limits.append(limit)
    return keys, limits


def _parse_tls(check: _Validator, path: str, fields: dict[str, _Located], urls: list[str]) -> dict[str, Any]:
    """`tls_verify` and `ca_file`, for HTTPS upstreams with self-signed or private-CA
    certificates. The CA file is read now, so a wrong path fails at start-up."""
    changes: dict[str, Any] = {}
    https = any(url.startswith("https://") for url in urls)
    if "tls_verify" in fields:
        changes["tls_verify"] = check.boolean(f"{path}.tls_verify", fields["tls_verify"])
    if "ca_file" in fields:
        item = fields["ca_file"]
        if changes.get("tls_verify") is False:
            raise check.fail(f"{path}.ca_file", item, "tls_verify: false skips verification: remove one of the two")
        ca_file = Path(check.string(f"{path}.ca_file", item).strip()).expanduser()
        if not ca_file.is_absolute() and check.source and not check.source.startswith("<"):
            ca_file = Path(check.source).resolve().parent / ca_file
        if problem := check_ca_file(ca_file):
            raise check.fail(f"{path}.ca_file", item, problem)
        changes["ca_file"] = str(ca_file)
    for name in ("tls_verify", "ca_file"):
        if name in fields and not https:
            raise check.fail(f"{path}.{name}", fields[name], "applies to https:// upstreams only, and this channel has none")
    return changes


def check_ca_file(path: Path) -> str | None:
    """Why `path` cannot serve as a channel's trusted CA certificates, or None."""
    if not path.is_file():
        return f"no such file: {path}"
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as e:
        return f"{path} holds no usable PEM certificate ({type(e).__name__})"
    return None


def load_config(path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{source}: cannot read config file: {e}") from None
    return parse_config(text, source, environ)
