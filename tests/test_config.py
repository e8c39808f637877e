"""Config loading and validation (pure)."""

import textwrap
from pathlib import Path

import pytest

from ccx_addon.config import ConfigError, expand_env, load_config, parse_config, url_without_credentials

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-very-secret-123"


def parse(text: str, env=None):
    return parse_config(textwrap.dedent(text), "cfg.yaml", env if env is not None else {})


def error_of(text: str, env=None) -> str:
    with pytest.raises(ConfigError) as raised:
        parse(text, env)
    return str(raised.value)


VALID = """\
    proxy_access_keys: ["pk"]
    channels:
      - name: a
        base_url: https://api.example.com/v1
        api_keys: ["k1", "k2"]
"""


def test_minimal_config_and_defaults():
    config = parse(VALID)
    [channel] = config.channels
    assert channel.name == "a" and channel.api_keys == ("k1", "k2")
    assert channel.chat_url == "https://api.example.com/v1/chat/completions"
    assert channel.enabled and channel.active and not channel.fallback
    assert channel.timeouts.idle == 120 and channel.cooldown == 60
    assert config.max_attempts == 5


def test_env_expansion_and_defaults():
    assert expand_env("${A}-${B:-dflt}-${C:-}", {"A": "x"}) == "x-dflt-"
    assert expand_env("${A:-d}", {"A": ""}) == "d"
    config = parse("""\
        proxy_access_keys: ["${PK}"]
        channels:
          - name: a
            base_url: ${BASE:-https://api.example.com}
            api_keys: ["${KEY}"]
    """, {"PK": "pk", "KEY": SECRET})
    assert config.proxy_access_keys == ("pk",)
    assert config.channels[0].base_url == "https://api.example.com"
    assert config.channels[0].api_keys == (SECRET,)


def test_missing_env_var_is_named():
    message = error_of("""\
        proxy_access_keys: ["pk"]
        channels:
          - name: a
            base_url: https://x
            api_keys: ["${DEEPSEEK_API_KEY}"]
    """)
    assert message == "cfg.yaml, line 5, channels[0].api_keys[0]: environment variable DEEPSEEK_API_KEY is not set"


def test_proxy_key_from_environment_when_field_absent():
    text = "channels:\n  - name: a\n    base_url: https://x\n    api_keys: [k]\n"
    assert parse(text, {"PROXY_ACCESS_KEY": "from-env"}).proxy_access_keys == ("from-env",)
    assert "PROXY_ACCESS_KEY" in error_of(text, {})


@pytest.mark.parametrize("snippet, expected", [
    ("    colour: red\n", "line 6, channels[0].colour: unknown field"),
    ("    priority: first\n", "line 6, channels[0].priority: must be a whole number, not a string"),
    ("    enabled: maybe\n", "line 6, channels[0].enabled: must be true or false"),
    ("    supported_models: gpt*\n", "line 6, channels[0].supported_models: must be a list of strings"),
    ("    model_mapping: [a, b]\n", "line 6, channels[0].model_mapping: must be a mapping"),
    ("    timeouts: {idle: -1}\n", "channels[0].timeouts.idle: must be at least 0"),
    ("    auth_header: basic\n", "channels[0].auth_header: must be bearer or x-api-key"),
    ("    headers: {Authorization: x}\n", "channels[0].headers.Authorization: is set by the gateway"),
])
def test_wrong_fields_name_file_line_and_path(snippet, expected):
    text = VALID.rstrip("\n") + "\n" + textwrap.indent(snippet, "    ")
    message = error_of(text)
    assert message.startswith("cfg.yaml, line")
    assert expected in message


def test_duplicate_names_empty_keys_and_bad_urls():
    dup = VALID + "      - name: a\n        base_url: https://y\n        api_keys: [k]\n"
    assert "line 6, channels[1].name: duplicate channel name 'a' (first at channels[0])" in error_of(dup)
    assert "api_keys: must list at least one key" in error_of(VALID.replace('["k1", "k2"]', "[]"))
    for url, problem in (
        ("ftp://x", "must start with http:// or https://"),
        ("https://", "has no host"),
        ("https://api.openai.com/v1/chat/completions", "not the /chat/completions endpoint"),
        ("https://x:notaport", "invalid port"),
    ):
        assert problem in error_of(VALID.replace("https://api.example.com/v1", url))


def test_yaml_booleans_as_names_get_a_hint():
    assert "put the value in quotes" in error_of(VALID.replace("name: a", "name: off"))


def test_invalid_yaml_and_empty_file():
    assert error_of("channels: [\n").startswith("cfg.yaml, line 2: invalid YAML")
    assert error_of("") == "cfg.yaml: the file is empty"
    assert "duplicate key 'channels'" in error_of(textwrap.dedent(VALID) + "channels: []\n")


def test_secrets_never_appear_in_messages():
    # A key in the wrong place: the message points at it without quoting it.
    text = f"""\
        proxy_access_keys: "{SECRET}"
        channels:
          - name: a
            base_url: https://x
            api_keys: ["{SECRET}"]
            headers: {{"api-key": ["{SECRET}"]}}
    """
    message = error_of(text)
    assert "proxy_access_keys" in message and SECRET not in message
    message = error_of(text.replace(f'proxy_access_keys: "{SECRET}"', 'proxy_access_keys: ["pk"]'))
    assert SECRET not in message


def test_keys_expanding_to_empty_leave_the_channel_idle():
    config = parse(VALID.replace('["k1", "k2"]', '["${NOPE:-}"]'))
    assert not config.channels[0].active
    assert "no API key set" in config.channels[0].inactive_reason


def test_priority_orders_channels_and_repr_hides_keys():
    config = parse(VALID + "        priority: 5\n      - name: b\n        base_url: https://y\n        api_keys: [kb]\n        priority: 1\n")
    assert [c.name for c in config.channels] == ["b", "a"]
    assert "k1" not in repr(config) and "pk" not in repr(config).replace("'pk'", "")
    assert set(config.secrets) == {"pk", "k1", "k2", "kb"}


def test_shipped_configs_load():
    default = load_config(ROOT / "config" / "ccx.yaml", {"PROXY_ACCESS_KEY": "pk"})
    assert [c.name for c in default.channels if c.active] == ["echo"]
    assert {c.name for c in default.channels} == {"openai", "deepseek", "glm", "minimax", "kimi", "echo"}
    env = {name: "x" for name in ("PROXY_ACCESS_KEY", "OPENAI_API_KEY", "DEEPSEEK_API_KEY", "GLM_API_KEY", "MINIMAX_API_KEY", "MOONSHOT_API_KEY")}
    example = load_config(ROOT / "config" / "ccx.example.yaml", env)
    assert [c.base_url for c in example.channels] == [
        "https://api.openai.com/v1", "https://api.deepseek.com", "https://open.bigmodel.cn/api/paas/v4",
        "https://api.minimax.io/v1", "https://api.moonshot.ai/v1", "https://llm.example.com/v1",
        "https://vllm.internal:8000/v1",
    ]
    # Each shipped provider channel names its own preset.
    assert {c.name: c.preset for c in default.channels} == {
        "openai": "openai", "deepseek": "deepseek", "glm": "glm", "minimax": "minimax", "kimi": "kimi", "echo": "",
    }
    assert [c.preset for c in example.channels] == ["openai", "deepseek", "glm", "minimax", "kimi", "", ""]
    assert [glob for glob, _ in example.channels[-2].fixes] == ["*", "other-reasoner* !other-reasoner-lite*"]
    glm = example.channels[2]
    assert glm.urls == ("https://open.bigmodel.cn/api/paas/v4", "https://api.z.ai/api/paas/v4")
    assert glm.api_keys == ("x",) and glm.limit_of(0).rpm == 60 and glm.limit_of(0).max_concurrency == 2
    assert example.rewrites_model(glm) and not example.rewrites_model(example.channels[0])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/ccx.yaml", {})


def test_secrets_include_channel_header_values_and_base_url_credentials():
    import base64

    config = parse_config(textwrap.dedent("""\
        proxy_access_keys: ["pk-0123456789"]
        channels:
          - name: a
            base_url: https://tokenuser:p%40ss-word-123@api.example.com/v1
            api_keys: ["sk-a"]
            headers: {api-key: "azure-secret-1234", x-title: "My long app title", x-flag: "1", X-Custom-Org: "org-abcdefgh"}
          - name: b
            base_url: https://bare-token-abcdef@api.example.com/v1
            api_keys: ["sk-b"]
    """), environ={})
    basic = base64.b64encode(b"tokenuser:p@ss-word-123").decode()
    assert set(config.secrets) == {
        "pk-0123456789", "sk-a", "sk-b", "azure-secret-1234", "org-abcdefgh",
        "p%40ss-word-123", "p@ss-word-123", basic,
        "bare-token-abcdef", base64.b64encode(b"bare-token-abcdef:").decode(),
    }
    # Longest first, so a secret containing another is masked whole.
    assert [len(s) for s in config.secrets] == sorted((len(s) for s in config.secrets), reverse=True)
    assert url_without_credentials("https://u:p@h:1/v1") == "https://[ccx: redacted]@h:1/v1"
    assert url_without_credentials("https://h/v1") == "https://h/v1"
