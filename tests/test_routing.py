"""Mapping, allowlist and route planning (pure)."""

import textwrap

from ccx_addon.config import parse_config
from ccx_addon.routing import check_allowlist, listed_models, map_model, plan_routes


def mapping(**pairs):
    return tuple(pairs.items())


def test_exact_key_wins_over_longer_substring():
    rules = (("gpt-5-mini-long", "x"), ("gpt-5", "exact"))
    assert map_model(rules, "gpt-5").upstream_model == "exact"


def test_longest_substring_wins():
    rules = mapping(gpt="primary", mini="light")
    result = map_model(rules, "gpt-5-mini")
    assert (result.upstream_model, result.rule) == ("light", "mini")


def test_ties_go_to_the_first_written_key():
    assert map_model((("abc", "first"), ("xyz", "second")), "abc-xyz").upstream_model == "first"
    assert map_model((("xyz", "second"), ("abc", "first")), "abc-xyz").upstream_model == "second"


def test_glob_keys_match_the_whole_name():
    rules = (("o*", "reasoner"), ("mini", "light"))
    assert map_model(rules, "o3").upstream_model == "reasoner"
    assert map_model(rules, "gpt-o3").upstream_model == "gpt-o3"  # glob does not match inside
    assert map_model(rules, "o4-mini").upstream_model == "light"  # "mini" (4) beats "o*" (2)


def test_no_match_keeps_the_name_and_matching_ignores_case():
    assert map_model(mapping(gpt="x"), "claude").upstream_model == "claude"
    assert map_model(mapping(GPT="x"), "gpt-5").upstream_model == "x"


def test_allowlist_patterns():
    patterns = ("deepseek*", "gpt-?", "*-coder", "!gpt-4*", "exact-one")
    assert check_allowlist(patterns, ("deepseek-chat",)) is None
    assert check_allowlist(patterns, ("gpt-5",)) is None
    assert check_allowlist(patterns, ("qwen-coder",)) is None
    assert check_allowlist(patterns, ("exact-one",)) is None
    assert check_allowlist(patterns, ("gpt-4o",)) == "'gpt-4o' is excluded by '!gpt-4*'"
    assert check_allowlist(patterns, ("gpt-55",)) == "'gpt-55' does not match supported_models"
    # An exclude wins even when the other name would be allowed.
    assert check_allowlist(patterns, ("gpt-4o", "deepseek-chat")) is not None
    assert check_allowlist(("!bad",), ("anything",)) is None
    assert check_allowlist((), ("anything",)) is None


def make(text):
    return parse_config(textwrap.dedent(text), "t.yaml", {})


CONFIG = """\
    proxy_access_keys: [pk]
    channels:
      - name: primary
        base_url: https://a
        api_keys: [k]
        priority: 2
        supported_models: ["gpt-*", "!gpt-4*"]
      - name: deepseek
        base_url: https://b
        api_keys: [k]
        priority: 1
        model_mapping: {gpt: deepseek-chat, mini: deepseek-lite}
        supported_models: ["deepseek-*"]
      - name: off
        base_url: https://c
        api_keys: [k]
        enabled: false
      - name: echo
        base_url: "echo:"
        fallback: true
"""


def test_plan_orders_by_priority_and_explains_skips():
    config = make(CONFIG.replace("name: off", 'name: "off"'))
    plan = plan_routes(config, "gpt-5-mini")
    assert [(r.channel.name, r.upstream_model, r.rule) for r in plan.routes] == [
        ("deepseek", "deepseek-lite", "mini"), ("primary", "gpt-5-mini", None),
    ]
    skipped = dict(plan.skipped)
    assert skipped["off"] == "disabled"
    assert "fallback channel" in skipped["echo"]


def test_fallback_serves_only_when_nothing_else_does():
    config = make(CONFIG.replace("name: off", 'name: "off"'))
    assert [r.channel.name for r in plan_routes(config, "claude-4").routes] == ["echo"]
    plan = plan_routes(config, "gpt-4o")
    # deepseek maps gpt-4o -> deepseek-chat, which its allowlist admits; primary excludes it.
    assert [r.channel.name for r in plan.routes] == ["deepseek"]
    assert "excluded by '!gpt-4*'" in dict(plan.skipped)["primary"]


def test_listed_models():
    config = make(CONFIG.replace("name: off", 'name: "off"'))
    assert listed_models(config) == ["gpt", "mini"]
    config = make("""\
        proxy_access_keys: [pk]
        channels:
          - name: a
            base_url: https://a
            api_keys: [k]
            supported_models: ["deepseek-chat", "glm*", "!x"]
            model_mapping: {gpt-5: deepseek-chat, "o*": deepseek-chat}
    """)
    assert listed_models(config) == ["deepseek-chat", "gpt-5"]
