"""The body each attempt sends, and which channels a request's images rule out. Pure.

Every attempt starts from the client's bytes, so a failover never carries one channel's
fixes to the next. A channel without preset or `fixes:` takes the fast path of today: only
the model value changes, in place (body.replace_model).
"""

import json
import re
from json.decoder import scanstring

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


def build_attempt_body(
    raw: bytes, request: ChatRequest, route: Route, reasoning: ReasoningCache | None = None,
) -> tuple[bytes, tuple[str, ...]]:
    """The body to send over `route` and labels of the fixes applied (empty: none)."""
    channel = route.channel
    spec = fixes_for(channel, route.upstream_model)
    labels: list[str] = []
    if spec is not None:
        # A fresh copy of the client's body for this attempt, and where each member was.
        text, members = _members(raw)
        data = dict((m[0], m[1]) for m in members) if members is not None else json.loads(raw)
        recall = None
        if spec.passback and reasoning is not None:
            def recall(message: dict) -> str | None:
                return reasoning.recall(channel.name, message)
        touched: set[str] = set()
        labels = apply_fixes(data, spec, recall, touched)
    if not labels:
        body = replace_model(raw, request, route.upstream_model)
        return (with_stream_usage(body, request) if channel.stream_usage else body), ()
    data["model"] = route.upstream_model
    if channel.stream_usage and request.stream:
        options = data.get("stream_options")
        data["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    try:
        if members is not None:
            return _splice(text, members, data, touched).encode(), tuple(labels)
        return json.dumps(data, ensure_ascii=False).encode(), tuple(labels)
    except UnicodeEncodeError:  # a lone surrogate the client sent as "\ud800": keep it escaped
        return json.dumps(data).encode(), tuple(labels)


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _members(raw: bytes) -> tuple[str, list | None]:
    """The body as text and (key, value, start, end) of each top-level member, end being
    where its value ends; None for anything unusual (duplicate keys, a BOM, not UTF-8),
    which then takes the plain json.loads / json.dumps way."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return "", None
    at = _WHITESPACE.match(text).end()
    if text[at:at + 1] != "{":
        return text, None
    at = _WHITESPACE.match(text, at + 1).end()
    members: list = []
    while text[at:at + 1] == '"':
        start = at
        key, at = scanstring(text, at + 1)
        at = _WHITESPACE.match(text, at).end()
        if text[at:at + 1] != ":":
            return text, None
        at = _WHITESPACE.match(text, at + 1).end()
        try:
            if key == "messages" and text[at:at + 1] == "[":
                value, at = _elements(text, at)
            else:
                value, at = _DECODER.raw_decode(text, at)
        except ValueError:
            return text, None
        members.append((key, value, start, at))
        at = _WHITESPACE.match(text, at).end()
        if text[at:at + 1] != ",":
            break
        at = _WHITESPACE.match(text, at + 1).end()
    if text[at:at + 1] != "}" or text[at + 1:].strip() or len({m[0] for m in members}) != len(members):
        return text, None
    return text, members


class _Elements(list):
    """A JSON array as parsed, and where each element's text is: (start, end) by id()."""

    spans: dict


def _elements(text: str, at: int) -> tuple[list, int]:
    array = _Elements()
    array.spans = {}
    at = _WHITESPACE.match(text, at + 1).end()
    if text[at:at + 1] == "]":
        return array, at + 1
    while True:
        start = at
        value, at = _DECODER.raw_decode(text, at)
        array.append(value)
        array.spans[id(value)] = (start, at)
        at = _WHITESPACE.match(text, at).end()
        if text[at:at + 1] == "]":
            return array, at + 1
        if text[at:at + 1] != ",":
            raise ValueError("not a JSON array")
        at = _WHITESPACE.match(text, at + 1).end()


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _splice(text: str, members: list, data: dict, touched: set) -> str:
    """`data` as JSON, copying the client's own text for every member (and message) no fix
    changed: re-serializing the ~20 KB of tools and ~10 KB system prompt an agent sends
    costs more than all the fixes together."""
    parts = []
    for key, value, start, end in members:
        if key not in data:
            continue
        new = data[key]
        if isinstance(value, _Elements) and isinstance(new, list):
            spans = value.spans
            # Messages the fixes kept as they were keep their text; new or changed ones
            # (merged, added, given reasoning) are written anew.
            items = (text[slice(*spans[id(m)])] if id(m) in spans and id(m) not in touched else _dumps(m) for m in new)
            parts.append(text[start:value_start(text, start)] + "[" + ",".join(items) + "]")
        elif key in touched or new is not value:
            parts.append(_dumps(key) + ":" + _dumps(new))
        else:
            parts.append(text[start:end])
    written = {m[0] for m in members}
    parts += [_dumps(k) + ":" + _dumps(v) for k, v in data.items() if k not in written]
    return "{" + ",".join(parts) + "}"


def value_start(text: str, member_start: int) -> int:
    """Where the value of the member whose key starts at `member_start` begins."""
    _, at = scanstring(text, member_start + 1)
    at = _WHITESPACE.match(text, at).end()
    return _WHITESPACE.match(text, at + 1).end()


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
