"""`ccx-addon check | explain MODEL | opencode-config` and the `ccx.explain` command: what
the gateway would do, told without sending anything and without printing any key."""

import json
import os
import subprocess
import textwrap

import httpx
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from harness import BIN

from ccx_addon import cli
from ccx_addon.config import parse_config
from ccx_addon.explain import explain_model, format_explanation

SECRETS = (PROXY_KEY, *UPSTREAM_KEYS)

EXAMPLE = config(
    channel("openai", "https://api.openai.com/v1", keys=(UPSTREAM_KEYS[0],), extra='supported_models: ["gpt-*", "!gpt-3.5*"]'),
    channel("deepseek", "https://api.deepseek.com", keys=(UPSTREAM_KEYS[1],),
            extra='model_mapping: {gpt: deepseek-chat, "o*": deepseek-reasoner}\nsupported_models: ["deepseek-*", "gpt-*", "o*"]'),
    channel("glm", "https://open.bigmodel.cn/api/paas/v4", keys=("${GLM_TEST_KEY:-}",), extra='supported_models: ["glm-4.6"]'),
    channel("kimi", "https://api.moonshot.ai/v1", keys=(UPSTREAM_KEYS[2],), extra='supported_models: ["kimi-k2"]\nenabled: false'),
) + '  - name: echo\n    base_url: "echo:"\n    fallback: true\n'


def ccx_addon(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PROXY_ACCESS_KEY", "GLM_TEST_KEY")}
    environ.update(env or {})
    return subprocess.run([str(BIN / "ccx-addon"), *args], capture_output=True, text=True, timeout=60,
                          env=environ, stdin=subprocess.DEVNULL)


def assert_no_secret(*texts: str) -> None:
    for secret in SECRETS:
        for text in texts:
            assert secret not in text, secret


def test_check_prints_what_a_valid_config_serves(write_config):
    path = write_config(EXAMPLE)
    result = ccx_addon("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(f"{path}: valid\n")
    assert "proxy access keys: 1; max_attempts: 5" in out
    assert "openai    active; https://api.openai.com/v1/chat/completions; 1 key(s); models: gpt-*, !gpt-3.5*" in out
    assert "glm       inactive: no API key set" in out
    assert "kimi      disabled" in out
    assert "echo      active; echo: built-in; fallback; models: any" in out
    assert "mapping: gpt → deepseek-chat, o* → deepseek-reasoner" in out
    assert "serving through: openai, deepseek, echo" in out
    assert out.endswith("\n  /v1/models lists: gpt\n")  # the exact names, as GET /v1/models
    assert_no_secret(out, result.stderr)


def test_check_fails_with_file_and_line_and_no_secret(write_config):
    broken = EXAMPLE.replace('    supported_models: ["glm-4.6"]', "    supported_models: glm-4.6")
    line = broken.splitlines().index("    supported_models: glm-4.6") + 1
    path = write_config(broken)
    result = ccx_addon("check", "--config", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"{path}, line {line}, channels[2].supported_models: must be a list of strings" in result.stderr
    assert_no_secret(result.stdout, result.stderr)

    # Without the proxy key the config is unusable: check says so (explain does not need it).
    default = ccx_addon("check")
    assert default.returncode == 1 and "PROXY_ACCESS_KEY is not set" in default.stderr
    assert ccx_addon("check", "--config", str(path.parent / "missing.yaml")).returncode == 1


def test_explain_tells_each_channel_the_rule_and_the_upstream(write_config):
    path = write_config(EXAMPLE)
    result = ccx_addon("explain", "gpt-5", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Model 'gpt-5':"
    assert lines[1:5] == [
        "  allowed #1 openai    gpt-5 (no model_mapping rule, sent as requested)",
        "                       → https://api.openai.com/v1/chat/completions",
        "  allowed #2 deepseek  gpt-5 → deepseek-chat (model_mapping rule 'gpt')",
        "                       → https://api.deepseek.com/chat/completions",
    ]
    assert "  skipped    glm       no API key set (every entry of api_keys expanded to empty)" in lines
    assert "  skipped    kimi      disabled" in lines
    assert "  skipped    echo      fallback channel, not used while another channel serves this model" in lines
    assert lines[-1].startswith("A request is sent to openai (gpt-5), then deepseek (deepseek-chat);")
    assert_no_secret(result.stdout, result.stderr)


def test_explain_cases_from_the_routing_rules():
    cfg = parse_config(EXAMPLE, environ={"GLM_TEST_KEY": "sk-glm"})
    text = format_explanation(explain_model(cfg, "gpt-3.5-turbo"))
    assert "skipped    openai    'gpt-3.5-turbo' is excluded by '!gpt-3.5*'" in text
    assert "allowed #1 deepseek  gpt-3.5-turbo → deepseek-chat (model_mapping rule 'gpt')" in text

    text = format_explanation(explain_model(cfg, "o3-mini"))
    assert "allowed #1 deepseek  o3-mini → deepseek-reasoner (model_mapping rule 'o*')" in text
    assert "skipped    openai    'o3-mini' does not match supported_models" in text

    text = format_explanation(explain_model(cfg, "glm-4.6"))
    assert "allowed #1 glm       glm-4.6 (no model_mapping rule" in text

    text = format_explanation(explain_model(cfg, "llama-9"))
    assert "allowed #1 echo      llama-9" in text and "→ echo: (answered by the gateway itself)" in text

    no_fallback = parse_config(config(channel("only", "https://x.example/v1", extra='supported_models: ["a"]')), environ={})
    text = format_explanation(explain_model(no_fallback, "b"))
    assert text.endswith("No channel serves 'b': a request gets 404 model_not_found.")

    resting = format_explanation(explain_model(cfg, "gpt-5"), {
        "openai": {"circuit": "open", "keys": [{"key": "openai#1", "disabled": None, "cooling_for_s": 0}]},
        "deepseek": {"circuit": "closed", "keys": [{"key": "deepseek#1", "disabled": None, "cooling_for_s": 12.5}]},
    })
    assert "now: circuit open" in resting and "now: resting keys deepseek#1" in resting


def test_opencode_config_is_ready_to_paste_and_lists_what_v1_models_lists(write_config, gateway):
    path = write_config(EXAMPLE)
    result = ccx_addon("opencode-config", "--config", str(path), "--listen", "127.0.0.1:4000")
    assert result.returncode == 0, result.stderr
    block = json.loads(result.stdout)
    provider = block["provider"]["ccx"]
    assert provider["npm"] == "@ai-sdk/openai-compatible"
    assert provider["options"] == {"baseURL": "http://localhost:4000/v1", "apiKey": "{env:PROXY_ACCESS_KEY}"}
    assert block["model"] == "ccx/" + next(iter(provider["models"]))
    assert_no_secret(result.stdout, result.stderr)

    # The same models a client gets from GET /v1/models of a gateway with this config.
    gw = gateway(EXAMPLE)
    listed = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {PROXY_KEY}"}).json()
    assert list(provider["models"]) == [m["id"] for m in listed["data"]]
    assert provider["models"]  # the example names exact models
    assert all(provider["models"][name] == {"name": name} for name in provider["models"])


def test_opencode_config_without_exact_models_says_how_to_add_them(capsys):
    # The shipped default config: globs only, and no proxy key needed to print the block.
    assert cli.run(["opencode-config", "--model", "gpt-5"]) == 0
    out, err = capsys.readouterr()
    block = json.loads(out)
    assert block["provider"]["ccx"]["models"] == {"gpt-5": {"name": "gpt-5"}}
    assert block["model"] == "ccx/gpt-5"
    assert cli.PLACEHOLDER_PROXY_KEY not in out

    assert cli.run(["opencode-config"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["provider"]["ccx"]["models"] == {} and "model" not in json.loads(out)
    assert "add models with --model NAME" in err


def test_base_url_for_listen_addresses():
    assert cli.base_url_for("127.0.0.1:3000") == "http://localhost:3000/v1"
    assert cli.base_url_for("0.0.0.0:3000") == "http://localhost:3000/v1"
    assert cli.base_url_for("192.168.1.5:3001") == "http://192.168.1.5:3001/v1"
    assert cli.base_url_for("[fe80::1]:3000") == "http://[fe80::1]:3000/v1"


def test_starting_the_gateway_passes_an_explicit_reverse_mode():
    args = cli.mitmproxy_args(None, "127.0.0.1:4000", ["--set", "flow_detail=0"])
    assert args[args.index("--mode") + 1] == "reverse:http://127.0.0.1:9@127.0.0.1:4000"
    assert "connection_strategy=lazy" in args and args[-2:] == ["--set", "flow_detail=0"]
    from_set = cli.mitmproxy_args(None, None, ["--set", "ccx_listen=127.0.0.1:4001"])
    assert from_set[from_set.index("--mode") + 1].endswith("@127.0.0.1:4001")
    default = cli.mitmproxy_args(None, None, [])
    assert default[default.index("--mode") + 1].endswith("@127.0.0.1:3000")
    own = cli.mitmproxy_args(None, None, ["--mode", "regular@8080"])
    assert own.count("--mode") == 1 and "connection_strategy=lazy" not in own
    assert "--mode" not in cli.mitmproxy_args(None, None, ["--set", "mode=regular@8080"])
    with pytest.raises(SystemExit):
        cli.run(["--listen", "nonsense"])


def test_ccx_explain_command_uses_the_config_in_force(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1", extra="model_mapping: {gpt: up-model}")))
    text = gw.call(gw.master.commands.call, "ccx.explain", "gpt-5")
    assert text.startswith("Model 'gpt-5':\n  allowed #1 main  gpt-5 → up-model (model_mapping rule 'gpt')")
    assert f"→ {up.url}/v1/chat/completions" in text
    assert up.received == []  # nothing was sent
    assert_no_secret(text)


def test_help_mentions_the_subcommands():
    result = ccx_addon("--help")
    assert result.returncode == 0
    assert "check | explain MODEL | opencode-config" in textwrap.dedent(result.stdout).replace("\n", " ")


def test_explain_lists_the_request_fixes_of_presets_and_channel_fixes(write_config):
    text = EXAMPLE.replace('    supported_models: ["gpt-*", "!gpt-3.5*"]\n',
                        '    supported_models: ["gpt-*", "!gpt-3.5*"]\n    preset: openai\n', 1)
    text = text.replace('    supported_models: ["deepseek-*", "gpt-*", "o*"]\n',
                        '    supported_models: ["deepseek-*", "gpt-*", "o*"]\n    preset: deepseek\n'
                        '    fixes: {models: {"deepseek-chat": {drop_params: [logprobs]}}}\n', 1)
    path = write_config(text)
    result = ccx_addon("explain", "gpt-5", "--config", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "fixes (preset openai):\n" in out
    assert "- rename max_tokens→max_completion_tokens" in out and "- drop temperature unless 1" in out
    assert "fixes (preset deepseek + channel fixes):\n" in out
    assert "- clamp max_tokens ≥1 ≤8192" in out and "- drop logprobs" in out
    assert "- no images (requests with image parts skip this channel)" in out
    check = ccx_addon("check", "--config", str(path))
    assert "preset deepseek + own fixes" in check.stdout
    assert_no_secret(out, check.stdout)
