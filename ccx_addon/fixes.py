"""Request fixes for upstreams that refuse what OpenCode (or any OpenAI client) sends. Pure.

One function per fix. Each takes the parsed request body (a fresh copy per attempt, changed
in place) and its parameter, and returns short labels for what it changed, which the flow
comment shows (`max_tokens→max_completion_tokens`, `−temperature`, `+reasoning_content×2`).
`FixSpec` holds the parameters of every fix; presets (presets.py) and the channel's
`fixes:` config are FixSpecs, merged in order (`merge`) and applied by `apply_fixes`.
"""

import dataclasses
import json
from collections.abc import Callable
from typing import Any

Pairs = tuple[tuple[str, Any], ...]

# Part types that carry an image in Chat Completions content arrays.
IMAGE_PART_TYPES = frozenset({"image_url", "input_image", "image"})
# A value_map source that matches any value.
ANY_VALUE = "*"


@dataclasses.dataclass(frozen=True)
class Frozen:
    """A JSON object or array from the config, kept as text so specs stay hashable (they
    are cache keys); `thaw` gives a fresh copy to put in a body."""

    json: str


def thaw(value: Any) -> Any:
    return json.loads(value.json) if isinstance(value, Frozen) else value


@dataclasses.dataclass(frozen=True)
class Clamp:
    minimum: float | None = None
    maximum: float | None = None


@dataclasses.dataclass(frozen=True)
class FixSpec:
    """What to change in a request. `None` means "not said": a later layer's value wins
    only where it says something (see `merge`)."""

    drop_params: tuple[str, ...] = ()
    # Drop a parameter unless it has exactly this value (gpt-5: temperature only 1).
    drop_unless: Pairs = ()
    rename_params: Pairs = ()  # (old, new): only when new is absent, else old is dropped
    set_params: Pairs = ()  # always set
    default_params: Pairs = ()  # set when absent
    clamp: tuple[tuple[str, Clamp], ...] = ()
    value_map: tuple[tuple[str, Pairs], ...] = ()  # param -> ((from, to), ...); to None drops it
    role_map: Pairs = ()
    merge_system_messages: bool | None = None
    ensure_user_turn: bool | None = None
    flatten_content: tuple[str, ...] | None = None  # roles whose text-only arrays become strings
    function_tools_only: bool | None = None
    json_schema_to_json_object: bool | None = None
    tool_parameters: bool | None = None  # give every function tool a `parameters` object
    images: bool | None = None  # False: the upstream takes no image parts
    # "all" (every assistant message), "tool_calls" (those with tool calls), "off".
    reasoning_passback: str | None = None
    reasoning_placeholder: str | None = None  # sent when the reasoning was never seen

    @property
    def takes_images(self) -> bool:
        return self.images is not False

    @property
    def passback(self) -> str:
        return self.reasoning_passback if self.reasoning_passback in ("all", "tool_calls") else ""


def _merge_pairs(a: Pairs, b: Pairs) -> Pairs:
    merged = dict(a)
    merged.update(b)
    return tuple(merged.items())


def merge(base: FixSpec, over: FixSpec) -> FixSpec:
    """`over` on top of `base`: mappings merge key by key (over wins), drop lists add up,
    every other field takes over's value where over says one."""
    changes: dict[str, Any] = {}
    for field in dataclasses.fields(FixSpec):
        a, b = getattr(base, field.name), getattr(over, field.name)
        if field.name == "drop_params":
            changes[field.name] = tuple(dict.fromkeys(a + b))
        elif field.name == "value_map":
            maps = {k: dict(v) for k, v in a}
            for k, v in b:
                maps.setdefault(k, {}).update(v)
            changes[field.name] = tuple((k, tuple(v.items())) for k, v in maps.items())
        elif isinstance(field.default, tuple):
            changes[field.name] = _merge_pairs(a, b) if b else a
        else:
            changes[field.name] = a if b is None else b
    return FixSpec(**changes)


# --- parameter fixes ------------------------------------------------------------------------


def drop_params(data: dict, names: tuple[str, ...]) -> list[str]:
    labels = []
    for name in names:
        if name in data:
            del data[name]
            labels.append(f"−{name}")
    return labels


def drop_unless(data: dict, allowed: Pairs) -> list[str]:
    labels = []
    for name, value in allowed:
        if name in data and data[name] != thaw(value):
            del data[name]
            labels.append(f"−{name}")
    return labels


def rename_params(data: dict, renames: Pairs) -> list[str]:
    labels = []
    for old, new in renames:
        if old not in data:
            continue
        value = data.pop(old)
        if new in data:
            labels.append(f"−{old}")  # the client sent both: keep the one the upstream wants
        else:
            data[new] = value
            labels.append(f"{old}→{new}")
    return labels


def set_params(data: dict, values: Pairs) -> list[str]:
    labels = []
    for name, value in values:
        value = thaw(value)
        if data.get(name, _MISSING) != value:
            data[name] = value
            labels.append(f"{name}={_short(value)}")
    return labels


def default_params(data: dict, values: Pairs) -> list[str]:
    labels = []
    for name, value in values:
        if name not in data:
            data[name] = thaw(value)
            labels.append(f"+{name}")
    return labels


def clamp_params(data: dict, limits: tuple[tuple[str, Clamp], ...]) -> list[str]:
    labels = []
    for name, limit in limits:
        value = data.get(name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        clamped = value
        if limit.maximum is not None and clamped > limit.maximum:
            clamped = limit.maximum
        if limit.minimum is not None and clamped < limit.minimum:
            clamped = limit.minimum
        if clamped != value:
            data[name] = clamped
            labels.append(f"{name} {_short(value)}→{_short(clamped)}")
    return labels


def map_values(data: dict, maps: tuple[tuple[str, Pairs], ...]) -> list[str]:
    """Replace a parameter's value: an exact (string) match first, else `*` for any other
    value; a target of None drops the parameter."""
    labels = []
    for name, pairs in maps:
        if name not in data:
            continue
        value = data[name]
        table = dict(pairs)
        if isinstance(value, str) and value in table:
            target = thaw(table[value])
        elif ANY_VALUE in table:
            target = thaw(table[ANY_VALUE])
        else:
            continue
        if target == value:
            continue
        if target is None:
            del data[name]
            labels.append(f"−{name}")
        else:
            data[name] = target
            labels.append(f"{name} {_short(value)}→{_short(target)}")
    return labels


# --- message fixes --------------------------------------------------------------------------


def _note(changed: set | None, message: dict) -> None:
    """Record a message changed in place (by id: the body builder re-serializes only those)."""
    if changed is not None:
        changed.add(id(message))


def _messages(data: dict) -> list:
    messages = data.get("messages")
    return messages if isinstance(messages, list) else []


def map_roles(data: dict, roles: Pairs, changed: set | None = None) -> list[str]:
    table = dict(roles)
    counts: dict[tuple[str, str], int] = {}
    for message in _messages(data):
        if isinstance(message, dict) and isinstance(role := message.get("role"), str) and role in table:
            message["role"] = table[role]
            _note(changed, message)
            counts[(role, table[role])] = counts.get((role, table[role]), 0) + 1
    return [f"role {a}→{b}" + (f"×{n}" if n > 1 else "") for (a, b), n in counts.items()]


def text_of(content: Any) -> str | None:
    """The text of a message content (a string, or an array of only text parts), else None."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def merge_system_messages(data: dict, enabled: bool) -> list[str]:
    """Every system message joined into one, where the first one was (MiniMax: 2013)."""
    messages = _messages(data)
    systems = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
    if not enabled or len(systems) < 2:
        return []
    texts = [text_of(m.get("content")) for m in systems]
    if any(t is None for t in texts):
        return []  # non-text system content: leave it to the upstream
    first = messages.index(systems[0])
    kept = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    kept.insert(first, {**systems[0], "content": "\n\n".join(texts)})
    data["messages"] = kept
    return [f"merged {len(systems)} system messages"]


ENSURED_USER_TEXT = "Continue."


def ensure_user_turn(data: dict, enabled: bool) -> list[str]:
    """A user message after the system messages when there is none (GLM: 1214)."""
    messages = _messages(data)
    if not enabled or "messages" not in data or any(
        isinstance(m, dict) and m.get("role") == "user" for m in messages
    ):
        return []
    at = 0
    while at < len(messages) and isinstance(messages[at], dict) and messages[at].get("role") in ("system", "developer"):
        at += 1
    messages.insert(at, {"role": "user", "content": ENSURED_USER_TEXT})
    return ["+user turn"]


def flatten_content(data: dict, roles: tuple[str, ...], changed: set | None = None) -> list[str]:
    """Text-only content arrays of these roles become strings (GLM drops them silently)."""
    count = 0
    for message in _messages(data):
        if isinstance(message, dict) and message.get("role") in roles and isinstance(message.get("content"), list):
            text = text_of(message["content"])
            if text is not None:
                message["content"] = text
                _note(changed, message)
                count += 1
    return [f"flattened content×{count}"] if count else []


# --- tools and formats ----------------------------------------------------------------------


def function_tools_only(data: dict, enabled: bool) -> list[str]:
    tools = data.get("tools")
    if not enabled or not isinstance(tools, list):
        return []
    kept = [t for t in tools if isinstance(t, dict) and t.get("type") == "function"]
    if len(kept) == len(tools):
        return []
    labels = [f"−tools×{len(tools) - len(kept)} (not function)"]
    if kept:
        data["tools"] = kept
    else:
        del data["tools"]
        if data.pop("tool_choice", None) is not None:
            labels.append("−tool_choice")
    return labels


def json_schema_to_json_object(data: dict, enabled: bool) -> list[str]:
    fmt = data.get("response_format")
    if enabled and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        data["response_format"] = {"type": "json_object"}
        return ["response_format json_schema→json_object"]
    return []


def tool_parameters(data: dict, enabled: bool) -> list[str]:
    """Function tools without `parameters` get an empty object schema (MiniMax: 2013)."""
    count = 0
    tools = data.get("tools") if enabled else None
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and not function.get("parameters"):
            function["parameters"] = {"type": "object", "properties": {}}
            count += 1
    return [f"+tool parameters×{count}"] if count else []


def has_image_parts(data: dict) -> bool:
    for message in _messages(data):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and isinstance(p.get("type"), str) and p["type"] in IMAGE_PART_TYPES for p in content
        ):
            return True
    return False


# --- reasoning passback ---------------------------------------------------------------------

Recall = Callable[[dict], str | None]


def restore_reasoning(
    data: dict, scope: str, placeholder: str | None, recall: Recall | None, changed: set | None = None,
) -> list[str]:
    """Put `reasoning_content` on assistant messages that lack it (an absent, null or empty
    field): the text the gateway saw (`recall`), else `placeholder` (None: leave it out).
    A non-empty value the client sent is never touched. `scope`: "all" assistant
    messages or only those with "tool_calls"."""
    restored = placeheld = 0
    for message in _messages(data):
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        if scope == "tool_calls" and not message.get("tool_calls"):
            continue
        if message.get("reasoning_content"):
            continue
        text = recall(message) if recall is not None else None
        if text:
            message["reasoning_content"] = text
            _note(changed, message)
            restored += 1
        elif placeholder is not None:
            message["reasoning_content"] = placeholder
            _note(changed, message)
            placeheld += 1
    total = restored + placeheld
    if not total:
        return []
    return [f"+reasoning_content×{total}" + (f" ({placeheld} placeholder)" if placeheld else "")]


# --- all of them ----------------------------------------------------------------------------


def apply_fixes(data: dict, spec: FixSpec, recall: Recall | None = None, touched: set | None = None) -> list[str]:
    """Every fix `spec` asks for, in a fixed order: messages first (roles before merging
    system messages), then parameters (rename before drop, so a renamed parameter is
    judged by its new name; set last), then tools and formats, then reasoning.
    `touched` gets "tools" when the tools were changed in place and the id() of each
    message changed in place (other parameters are replaced, not changed in place)."""
    messages: list[str] = []
    if spec.role_map:
        messages += map_roles(data, spec.role_map, touched)
    messages += merge_system_messages(data, bool(spec.merge_system_messages))
    messages += ensure_user_turn(data, bool(spec.ensure_user_turn))
    if spec.flatten_content:
        messages += flatten_content(data, spec.flatten_content, touched)
    params = rename_params(data, spec.rename_params)
    params += drop_params(data, spec.drop_params)
    params += drop_unless(data, spec.drop_unless)
    params += map_values(data, spec.value_map)
    params += clamp_params(data, spec.clamp)
    params += default_params(data, spec.default_params)
    params += set_params(data, spec.set_params)
    tools = function_tools_only(data, bool(spec.function_tools_only))
    tools += tool_parameters(data, bool(spec.tool_parameters))
    params += json_schema_to_json_object(data, bool(spec.json_schema_to_json_object))
    reasoning = restore_reasoning(data, spec.passback, spec.reasoning_placeholder, recall, touched) if spec.passback else []
    if touched is not None and tools:
        touched.add("tools")
    return messages + params + tools + reasoning


def describe(spec: FixSpec) -> list[str]:
    """What `spec` would do, in words (for `ccx-addon explain`)."""
    out = []
    if spec.role_map:
        out.append("roles " + ", ".join(f"{a}→{b}" for a, b in spec.role_map))
    if spec.merge_system_messages:
        out.append("merge system messages")
    if spec.ensure_user_turn:
        out.append("ensure a user turn")
    if spec.flatten_content:
        out.append("flatten text-only content of " + "/".join(spec.flatten_content) + " messages")
    out += [f"rename {a}→{b}" for a, b in spec.rename_params]
    if spec.drop_params:
        out.append("drop " + ", ".join(spec.drop_params))
    out += [f"drop {name} unless {_short(value)}" for name, value in spec.drop_unless]
    for name, pairs in spec.value_map:
        out.append(f"{name}: " + ", ".join(f"{_short(a)}→{_short(b) if b is not None else 'dropped'}" for a, b in pairs))
    for name, limit in spec.clamp:
        bounds = [f"≥{_short(limit.minimum)}"] if limit.minimum is not None else []
        bounds += [f"≤{_short(limit.maximum)}"] if limit.maximum is not None else []
        out.append(f"clamp {name} {' '.join(bounds)}")
    out += [f"default {name}={_short(v)}" for name, v in spec.default_params]
    out += [f"set {name}={_short(v)}" for name, v in spec.set_params]
    if spec.function_tools_only:
        out.append("function tools only")
    if spec.json_schema_to_json_object:
        out.append("response_format json_schema→json_object")
    if spec.tool_parameters:
        out.append("tools get parameters")
    if spec.passback:
        where = "every assistant message" if spec.passback == "all" else "assistant tool-call messages"
        out.append(f"reasoning_content passback on {where}"
                   + (f", placeholder {spec.reasoning_placeholder!r}" if spec.reasoning_placeholder is not None else ""))
    if not spec.takes_images:
        out.append("no images (requests with image parts skip this channel)")
    return out


_MISSING = object()


def _short(value: Any) -> str:
    """A value as a label shows it: short (a client's string may be long)."""
    value = thaw(value)
    if isinstance(value, str):
        return value if len(value) <= 24 else value[:23] + "…"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return "{…}" if isinstance(value, dict) else "[…]"
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)
