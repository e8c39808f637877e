"""The body each attempt sends, and which channels a request's images rule out. Pure.

Every attempt starts from the client's bytes, so a failover never carries one channel's
fixes to the next. A channel without preset or `fixes:` takes the fast path of today: only
the model value changes, in place (body.replace_model).
"""

import json

from .body import ChatRequest, replace_model, with_stream_usage
from .config import Channel
from .fixes import FixSpec, apply_fixes, has_image_parts
from .presets import resolve
from .reasoning import ReasoningCache
from .routing import Route, RoutePlan


def fixes_for(channel: Channel, upstream_model: str) -> FixSpec | None:
    """The fixes `channel` applies to requests for `upstream_model`, None for none."""
    if not channel.preset and not channel.fixes:
        return None
    return resolve(channel.preset, channel.fixes, upstream_model)


def attempt_body(
    raw: bytes, request: ChatRequest, route: Route, reasoning: ReasoningCache | None = None,
) -> tuple[bytes, tuple[str, ...]]:
    """The body to send over `route` and labels of the fixes applied (empty: none)."""
    channel = route.channel
    spec = fixes_for(channel, route.upstream_model)
    labels: list[str] = []
    if spec is not None:
        data = json.loads(raw)  # a fresh copy of the client's body for this attempt
        recall = None
        if spec.passback and reasoning is not None:
            def recall(message: dict) -> str | None:
                return reasoning.recall(channel.name, message)
        labels = apply_fixes(data, spec, recall)
    if not labels:
        body = replace_model(raw, request, route.upstream_model)
        return (with_stream_usage(body, request) if channel.stream_usage else body), ()
    data["model"] = route.upstream_model
    if channel.stream_usage and request.stream:
        options = data.get("stream_options")
        data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(data, ensure_ascii=False).encode("utf-8", "surrogatepass"), tuple(labels)


def has_images(request: ChatRequest) -> bool:
    # Bodies without the word are the rule: no parse for them.
    return b"image" in request.source and has_image_parts(request.data)


def image_refusals(plan: RoutePlan, request: ChatRequest) -> tuple[RoutePlan, list[tuple[str, str, str]]]:
    """`plan` without the channels that take no images when the request has image parts,
    and (channel, upstream model, reason) for each one left out."""
    refused = []
    for route in plan.routes:
        spec = fixes_for(route.channel, route.upstream_model)
        if spec is not None and not spec.takes_images:
            refused.append(route)
    if not refused or not has_images(request):
        return plan, []
    reasons = [
        (r.channel.name, r.upstream_model,
         f"takes no images ({'preset ' + r.channel.preset if r.channel.preset else 'fixes.images: false'})")
        for r in refused
    ]
    left_out = {id(r) for r in refused}
    routes = tuple(r for r in plan.routes if id(r) not in left_out)
    skipped = plan.skipped + tuple((name, reason) for name, _, reason in reasons)
    return RoutePlan(plan.model, routes, skipped), reasons
