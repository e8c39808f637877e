"""What the gateway would do, without sending anything: for a model, each channel with
allowed/skipped and why, the mapping rule and the upstream model and URL; for a config,
what it serves; and the opencode.json provider block that points at it.

Pure functions over a GatewayConfig (used by `ccx-addon explain|check|opencode-config`),
plus the `ccx.explain` command on a running gateway.
"""

import dataclasses
import json
import time

from mitmproxy import command

from .config import AffinitySettings, Channel, GatewayConfig, url_without_credentials
from .fixes import describe as describe_fixes
from .rewrite import fixes_for
from .routing import listed_models, map_model, plan_routes
from .state import GatewayState

PROVIDER_ID = "ccx"
KEY_REFERENCE = "{env:PROXY_ACCESS_KEY}"  # OpenCode reads the key from the environment


@dataclasses.dataclass(frozen=True)
class ChannelVerdict:
    channel: Channel
    position: int | None  # 1-based place in the order the gateway tries, None when skipped
    reason: str  # why it is skipped; "" for a candidate
    upstream_model: str
    rule: str | None  # the model_mapping key that applied
    rewrites_model: bool = False  # rewrite_response_model in force for this channel

    @property
    def url(self) -> str:
        if self.channel.is_echo:
            return "echo: (answered by the gateway itself)"
        return ", then ".join(url_without_credentials(url) for url in self.channel.chat_urls)


@dataclasses.dataclass(frozen=True)
class Explanation:
    model: str
    verdicts: tuple[ChannelVerdict, ...]  # in priority order
    max_attempts: int
    affinity: AffinitySettings = AffinitySettings()

    @property
    def candidates(self) -> list[ChannelVerdict]:
        return sorted((v for v in self.verdicts if v.position), key=lambda v: v.position)


def explain_model(config: GatewayConfig, model: str) -> Explanation:
    plan = plan_routes(config, model)
    positions = {route.channel.name: i for i, route in enumerate(plan.routes, 1)}
    reasons = dict(plan.skipped)
    verdicts = []
    for channel in config.channels:
        mapped = map_model(channel.model_mapping, model)
        verdicts.append(ChannelVerdict(
            channel, positions.get(channel.name), reasons.get(channel.name, ""),
            mapped.upstream_model, mapped.rule, config.rewrites_model(channel),
        ))
    return Explanation(model, tuple(verdicts), config.max_attempts, config.session_affinity)


def describe_mapping(model: str, verdict: ChannelVerdict) -> str:
    if verdict.rule is None:
        return f"{model} (no model_mapping rule, sent as requested)"
    return f"{model} → {verdict.upstream_model} (model_mapping rule {verdict.rule!r})"


def fixes_lines(verdict: ChannelVerdict) -> list[str]:
    """The request fixes the channel applies to the upstream model, one per line."""
    channel = verdict.channel
    if not channel.preset and not channel.fixes:
        return []
    source = " + ".join(filter(None, [f"preset {channel.preset}" if channel.preset else "",
                                      "channel fixes" if channel.fixes else ""]))
    spec = fixes_for(channel, verdict.upstream_model)
    described = describe_fixes(spec) if spec is not None else []
    if not described:
        return [f"fixes ({source}): none for {verdict.upstream_model}"]
    return [f"fixes ({source}):"] + [f"  - {line}" for line in described]


def format_explanation(explanation: Explanation, health: dict | None = None) -> str:
    """`health`: a HealthRegistry snapshot, to say which candidates are resting right now."""
    model = explanation.model
    lines = [f"Model {model!r}:"]
    width = max((len(v.channel.name) for v in explanation.verdicts), default=0)
    for verdict in explanation.verdicts:
        name = verdict.channel.name.ljust(width)
        if verdict.position is None:
            lines.append(f"  skipped    {name}  {verdict.reason}")
            continue
        lines.append(f"  allowed #{verdict.position} {name}  {describe_mapping(model, verdict)}")
        lines.append(f"  {'':{11 + width}}  → {verdict.url}")
        if fixes := fixes_lines(verdict):
            lines.extend(f"  {'':{11 + width}}  {line}" for line in fixes)
        if route := describe_proxy(verdict.channel):
            lines.append(f"  {'':{11 + width}}  {route}")
        lines.extend(f"  {'':{11 + width}}  {fact}" for fact in channel_parity_facts(verdict.channel, verdict.rewrites_model))
        if health and (state := health.get(verdict.channel.name)):
            if state.get("circuit") not in (None, "closed"):
                lines.append(f"  {'':{11 + width}}  now: circuit {state['circuit']}")
            resting = [k["key"] for k in state.get("keys", ()) if k.get("disabled") or k.get("cooling_for_s")]
            if resting:
                lines.append(f"  {'':{11 + width}}  now: resting keys {', '.join(resting)}")
            bound = [f"{k['key']} {k['sessions']}" for k in state.get("keys", ()) if k.get("sessions")]
            if bound:
                lines.append(f"  {'':{11 + width}}  now: sessions bound {', '.join(bound)}")
            limited = [f"{k['key']} ({k['at_limit']})" for k in state.get("keys", ()) if k.get("at_limit")]
            if limited:
                lines.append(f"  {'':{11 + width}}  now: keys at their limit {', '.join(limited)}")
    candidates = explanation.candidates
    if not candidates:
        lines.append(f"No channel serves {model!r}: a request gets 404 model_not_found.")
    else:
        lines.append(describe_affinity(explanation))
        order = ", then ".join(f"{v.channel.name} ({v.upstream_model})" for v in candidates)
        lines.append(
            f"A request is sent to {order}; it moves on after connection errors, timeouts, "
            f"408/429/5xx, with at most {explanation.max_attempts} upstream requests."
        )
    return "\n".join(lines)


def describe_affinity(explanation: Explanation) -> str:
    """One sentence on session affinity for the candidates of a model."""
    candidates = [v.channel for v in explanation.candidates]
    sticky = [c.name for c in candidates if c.session_affinity and len(c.api_keys) > 1]
    off = [c.name for c in candidates if not c.session_affinity and len(c.api_keys) > 1]
    if not sticky:
        why = "off" if off else "no candidate has more than one key"
        return f"Session affinity: {why}; keys are used round robin."
    settings = explanation.affinity
    text = (
        f"Session affinity: a request with x-session-id (or x-session-affinity) stays on one key "
        f"of {', '.join(sticky)} while that key is healthy, and moves once when it is not "
        f"(bindings last {settings.ttl / 3600:g}h after a session's last request, at most "
        f"{settings.max_sessions} sessions); requests without one rotate the keys."
    )
    return text + (f" Off for {', '.join(off)}." if off else "")


def describe_proxy(channel: Channel) -> str:
    """Which proxy a channel's requests go through, credentials masked; "" for a plain
    direct connection."""
    if channel.is_echo:
        return ""
    if channel.proxy is not None:
        source = "proxy_url" if channel.proxy.source == "proxy_url" else f"from {channel.proxy.source}"
        return f"via proxy {channel.proxy.display} ({source})"
    return f"direct ({channel.direct_because})" if channel.direct_because else ""


def channel_parity_facts(channel: Channel, rewrites_model: bool) -> list[str]:
    """Key weights and limits, and the response model rewrite, when set (never a key)."""
    facts = []
    limits = [f"{channel.key_label(i)} {limit}" for i in range(len(channel.api_keys)) if (limit := channel.limit_of(i).describe())]
    if limits:
        facts.append("key limits: " + "; ".join(limits) + " (counted per gateway process)")
    if rewrites_model:
        facts.append("answers name the requested model (rewrite_response_model)")
    if not channel.tls_verify:
        facts.append("TLS certificates not verified (tls_verify: false)")
    elif channel.ca_file:
        facts.append(f"TLS verified against {channel.ca_file}")
    return facts


def describe_channel(channel: Channel, config: GatewayConfig | None = None) -> str:
    if not channel.enabled:
        state = "disabled"
    elif channel.inactive_reason:
        state = f"inactive: {channel.inactive_reason}"
    else:
        state = "active"
    facts = [state, "echo: built-in" if channel.is_echo else ", then ".join(url_without_credentials(u) for u in channel.chat_urls)]
    if route := describe_proxy(channel):
        facts.append(route)
    if channel.api_keys:
        facts.append(f"{len(channel.api_keys)} key(s)")
        if len(channel.api_keys) > 1 and not channel.session_affinity:
            facts.append("session affinity off")
    if channel.headers:
        # Names only: header values are treated as secrets (README, "Secrets").
        facts.append("headers: " + ", ".join(name for name, _ in channel.headers))
    if channel.fallback:
        facts.append("fallback")
    if channel.preset or channel.fixes:
        facts.append(" + ".join(filter(None, [f"preset {channel.preset}" if channel.preset else "",
                                              "own fixes" if channel.fixes else ""])))
    facts.append("models: " + (", ".join(channel.supported_models) or "any"))
    if channel.model_mapping:
        facts.append("mapping: " + ", ".join(f"{k} → {v}" for k, v in channel.model_mapping))
    facts.extend(channel_parity_facts(channel, config is not None and config.rewrites_model(channel)))
    return "; ".join(facts)


def format_config_summary(config: GatewayConfig) -> str:
    """What `ccx-addon check` prints for a valid config. Never a key: only how many."""
    lines = [f"{config.source}: valid"]
    lines.append(f"  proxy access keys: {len(config.proxy_access_keys)}; max_attempts: {config.max_attempts}")
    lines.append("  channels, in the order they are tried:")
    width = max((len(c.name) for c in config.channels), default=0)
    for channel in config.channels:
        lines.append(f"    {channel.name.ljust(width)}  {describe_channel(channel, config)}")
    active = [c.name for c in config.channels if c.active]
    lines.append(f"  serving through: {', '.join(active) or 'nothing (no active channel)'}")
    models = listed_models(config)
    lines.append(f"  /v1/models lists: {', '.join(models) or '(none: no active channel names an exact model)'}")
    if fetched := [c.name for c in config.channels if c.active and c.lists_upstream_models]:
        lines.append(f"  /v1/models also lists, once fetched, the upstream model lists of: {', '.join(fetched)}")
    return "\n".join(lines)


def opencode_provider(config: GatewayConfig, base_url: str, extra_models: tuple[str, ...] = ()) -> dict:
    """The opencode.json block for this gateway: the key is an env reference, never the key."""
    models = list(dict.fromkeys([*listed_models(config), *extra_models]))
    block = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            PROVIDER_ID: {
                "npm": "@ai-sdk/openai-compatible",
                "name": "ccx-addon",
                "options": {"baseURL": base_url, "apiKey": KEY_REFERENCE},
                "models": {name: {"name": name} for name in models},
            }
        },
    }
    if models:
        block["model"] = f"{PROVIDER_ID}/{models[0]}"
    return block


def format_opencode_provider(block: dict) -> str:
    return json.dumps(block, indent=2, ensure_ascii=False)


class Explain:
    """`ccx.explain MODEL` in mitmweb/mitmproxy: routing for a model under the config in
    force, with the channels' current health. Sends nothing."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    @command.command("ccx.explain")
    def explain(self, model: str) -> str:
        """Explain which channels would serve MODEL, under which upstream name and URL."""
        health = self.state.health.snapshot(time.time()) if self.state.health else None
        return format_explanation(explain_model(self.state.config, model), health)
