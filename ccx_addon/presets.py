"""Provider presets as data: for each preset, the fixes (fixes.FixSpec) that provider needs
so OpenCode's ordinary requests succeed, scoped by upstream-model glob. Sources of every
rule: shared/notes/providers.md, sections 2-4.

A channel's fixes for a model are, in order: the preset's layers whose glob matches the
upstream model, then the channel's `fixes:`, then its `fixes.models` globs that match
(`resolve`). Later layers win (fixes.merge).
"""

import functools
from fnmatch import fnmatchcase

from .fixes import Clamp, FixSpec, merge

# (model globs, spec): globs separated by spaces, `!glob` excludes; "*" for every model.
Layers = tuple[tuple[str, FixSpec], ...]

_TO_MAX_TOKENS = (("max_completion_tokens", "max_tokens"),)

# OpenAI reasoning models (gpt-5, o-series): `max_tokens` gets 400 "Unsupported parameter:
# 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.";
# sampling knobs get "Unsupported parameter"/"Only the default (1) value is supported".
_OPENAI_REASONING = FixSpec(
    rename_params=(("max_tokens", "max_completion_tokens"),),
    drop_params=("top_p", "presence_penalty", "frequency_penalty", "stop", "logit_bias", "logprobs", "top_logprobs"),
    drop_unless=(("temperature", 1),),
)

OPENAI: Layers = (
    # gpt-5-chat is a plain chat model: it takes what OpenCode sends.
    ("gpt-5* !gpt-5-chat*", _OPENAI_REASONING),
    ("o[134]*", _OPENAI_REASONING),
)

DEEPSEEK: Layers = (
    ("*", FixSpec(
        rename_params=_TO_MAX_TOKENS,  # max_completion_tokens is ignored
        function_tools_only=True,  # "unknown variant '<type>', expected 'function'"
        json_schema_to_json_object=True,  # json_schema: "unavailable now"
        flatten_content=("system", "user", "assistant", "tool"),
        images=False,
        # Thinking mode: ``Missing `reasoning_content` field in the assistant message at
        # message index N``; " " is the least the API accepts (LiteLLM).
        reasoning_passback="all", reasoning_placeholder=" ",
    )),
    # "Invalid max_tokens value, the valid range of max_tokens is [1, 8192]"; OpenCode sends 32000.
    ("deepseek-chat*", FixSpec(clamp=(("max_tokens", Clamp(1, 8192)),))),
    ("deepseek-reasoner*", FixSpec(clamp=(("max_tokens", Clamp(1, 65536)),))),
)

GLM: Layers = (
    ("*", FixSpec(
        rename_params=_TO_MAX_TOKENS,
        value_map=(("tool_choice", (("*", "auto"),)),),  # 1214 "Tool choice must be auto"
        role_map=(("developer", "system"),),
        merge_system_messages=True,
        ensure_user_turn=True,  # no user message: 1214
        flatten_content=("tool", "assistant"),  # list content there is dropped silently
        clamp=(("temperature", Clamp(0, 1)), ("top_p", Clamp(None, 0.99))),
        # Preserved thinking wants it back; a missing one is not refused: no placeholder.
        reasoning_passback="all",
    )),
)

MINIMAX: Layers = (
    ("*", FixSpec(
        rename_params=_TO_MAX_TOKENS,
        role_map=(("developer", "system"),),
        merge_system_messages=True,  # a second system message: HTTP 200, base_resp 2013
        clamp=(("temperature", Clamp(0.01, 1)), ("top_p", Clamp(0.01, 1))),  # (0, 1]
        drop_params=("response_format",),
        tool_parameters=True,  # "function parameters is empty (2013)"
    )),
)

# Kimi models with fixed sampling and thinking: k2.5+, k3 and the k2 thinking models.
_KIMI_FIXED = ("kimi-k2.[5-9]*", "kimi-k3*", "kimi-k2-thinking*", "kimi-for-coding*")

KIMI: Layers = (
    ("*", FixSpec(
        rename_params=_TO_MAX_TOKENS,
        value_map=(("tool_choice", (("required", "auto"),)),),
        flatten_content=("system", "user", "assistant", "tool"),
        clamp=(("temperature", Clamp(0, 1)),),
    )),
) + tuple(
    (glob, FixSpec(
        # "invalid temperature: only 1 is allowed for this model" (and top_p 0.95, n, penalties)
        drop_params=("temperature", "top_p", "n", "presence_penalty", "frequency_penalty"),
        # "thinking is enabled but reasoning_content is missing in assistant tool call message at index N"
        reasoning_passback="tool_calls", reasoning_placeholder=" ",
    ))
    for glob in _KIMI_FIXED
)

PRESETS: dict[str, Layers] = {
    "openai": OPENAI, "deepseek": DEEPSEEK, "glm": GLM, "minimax": MINIMAX, "kimi": KIMI,
}


def matches(globs: str, model: str) -> bool:
    """Whether `model` matches one of the space-separated globs and none of the `!` ones
    (case-insensitive)."""
    model = model.lower()
    hit = False
    for glob in globs.lower().split():
        if glob.startswith("!"):
            if fnmatchcase(model, glob[1:]):
                return False
        elif not hit:
            hit = fnmatchcase(model, glob)
    return hit


@functools.lru_cache(maxsize=4096)
def resolve(preset: str, overrides: Layers, model: str) -> FixSpec | None:
    """The fixes for `model` (the upstream name): the preset's matching layers, then the
    channel's; None when nothing applies. Cached: configs are immutable, models few."""
    spec = None
    for glob, layer in PRESETS.get(preset, ()) + overrides:
        if glob == "*" or matches(glob, model):
            spec = layer if spec is None else merge(spec, layer)
    return spec
