"""The gateway as users start it: real `mitmdump -s ccx_addon/addon.py` and `ccx-addon`
subprocesses, the shipped default config, saved flows and logs searched for secrets."""

import json
import os
import subprocess
import textwrap

import httpx
import openai
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import json_answer
from harness import ADDON, BIN, SubprocessGateway, free_port

PROVIDER_ENV = ("OPENAI_API_KEY", "DEEPSEEK_API_KEY", "GLM_API_KEY", "MINIMAX_API_KEY", "MOONSHOT_API_KEY")


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROVIDER_ENV and k != "PROXY_ACCESS_KEY"}
    env.update(extra)
    return env


@pytest.fixture
def user_gateway(tmp_path):
    started = []

    def start(argv, port, env) -> SubprocessGateway:
        gw = SubprocessGateway(None, tmp_path, argv=argv, port=port)
        gw.env = env
        started.append(gw)
        return gw.start()

    yield start
    for gw in started:
        gw.stop()


def test_short_form_with_the_shipped_default_config_answers_with_echo(user_gateway, tmp_path):
    port = free_port()
    # Run from an unrelated directory: config/ccx.yaml is found in the checkout.
    gw = user_gateway(
        [str(BIN / "mitmdump"), "-s", str(ADDON), "--set", f"ccx_listen=127.0.0.1:{port}"],
        port, clean_env(PROXY_ACCESS_KEY=PROXY_KEY),
    )
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=PROXY_KEY, max_retries=0)
    reply = sdk.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hello gateway"}])
    assert reply.choices[0].message.content == "[ccx-addon echo] hello gateway"
    stream = sdk.chat.completions.create(model="deepseek-chat", messages=[{"role": "user", "content": "two words"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "[ccx-addon echo] two words"
    log = gw.log()
    assert f"listening at 127.0.0.1:{port}" in log
    assert "1 active channel(s): echo" in log and "openai (no API key set" in log
    # Only the gateway's address and the loopback hand-over stay open (mitmproxy 12 opens
    # *:8080 before loading the addon, which closes it).
    listening = listening_ports(gw.process.pid)
    assert ("127.0.0.1", port) in listening and len(listening) == 2
    assert all(host == "127.0.0.1" for host, _ in listening), listening


def listening_ports(pid: int) -> list[tuple[str, int]]:
    """TCP sockets the process listens on, from /proc (IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    address, port = local.split(":")
                    host = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)) if width == 8 else address
                    found.append((host, int(port, 16)))
    return sorted(found)


def test_default_listen_address_is_loopback_3000():
    from ccx_addon.modes import reverse_mode_spec

    assert reverse_mode_spec("127.0.0.1:3000") == "reverse:http://127.0.0.1:9@127.0.0.1:3000"
    with pytest.raises(ValueError):
        reverse_mode_spec("3000")


def test_long_form_with_standard_mitmproxy_flags(user_gateway, upstreams, write_config):
    up = upstreams()
    cfg = write_config(config(channel("main", up.url + "/v1", extra="model_mapping: {gpt: up-model}")))
    port = free_port()
    gw = user_gateway([
        str(BIN / "mitmdump"), "-s", str(ADDON),
        "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
        "--set", "connection_strategy=lazy", "--set", f"ccx_config={cfg}",
    ], port, clean_env())
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-5", "messages": []},
                   headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
    assert r.status_code == 200 and up.received[0].json["model"] == "up-model"


def test_console_script_starts_the_gateway(user_gateway, upstreams, write_config):
    up = upstreams()
    cfg = write_config(config(channel("main", up.url + "/v1")))
    port = free_port()
    gw = user_gateway([str(BIN / "ccx-addon"), "--config", str(cfg), "--listen", f"127.0.0.1:{port}"], port, clean_env())
    r = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", "messages": []},
                   headers={"x-api-key": PROXY_KEY}, timeout=10)
    assert r.status_code == 200


def test_broken_config_exits_non_zero_naming_file_and_line(tmp_path):
    secret = "sk-must-not-be-printed-42"
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        proxy_access_keys: ["{secret}"]
        channels:
          - name: main
            base_url: http://127.0.0.1:1/v1
            api_keys: ["{secret}"]
            priority: high
    """))
    result = subprocess.run(
        [str(BIN / "mitmdump"), "-s", str(ADDON), "--set", f"ccx_listen=127.0.0.1:{free_port()}", "--set", f"ccx_config={cfg}"],
        capture_output=True, text=True, timeout=30, env=clean_env(), stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{cfg}, line 6, channels[0].priority: must be a whole number" in output
    assert secret not in output


def test_no_secret_in_saved_flows_or_the_detailed_log(mitmdump, upstreams, tmp_path):
    # An upstream that echoes the key it received in its error body, as some do.
    def leaky(received):
        return json_answer(503, {"error": {"message": f"bad key {received.headers['authorization']}", "type": "x", "param": None, "code": None}})

    leaky_up = upstreams(leaky)
    good = upstreams()
    flows_file = tmp_path / "flows.mitm"
    gw = mitmdump(
        config(
            channel("leaky", leaky_up.url + "/v1", keys=(UPSTREAM_KEYS[0],)),
            channel("good", good.url + "/v1", keys=(UPSTREAM_KEYS[1], UPSTREAM_KEYS[2])),
        ),
        "-w", str(flows_file), "--set", "flow_detail=4",
    )
    auth = {"authorization": f"Bearer {PROXY_KEY}"}
    url = gw.url + "/v1/chat/completions"
    assert httpx.post(url, json={"model": "m", "messages": []}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(url, json={"model": "m", "stream": True, "messages": []}, headers=auth, timeout=10).status_code == 200
    assert httpx.post(url, json={"model": "m", "messages": []}, headers={"x-api-key": PROXY_KEY}, timeout=10).status_code == 200
    assert httpx.post(url, json={"model": "m"}, headers={"authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(gw.url + "/v1/models", headers=auth, timeout=10).status_code == 200
    assert httpx.get(gw.url + "/health", timeout=10).status_code == 200

    # With only the leaky channel left, its error body reaches the client: scrubbed.
    leaky_only = upstreams(leaky)
    gw2 = mitmdump(config(channel("leaky", leaky_only.url + "/v1", keys=(UPSTREAM_KEYS[0],))), "-w", str(tmp_path / "flows2.mitm"), "--set", "flow_detail=4")
    r = httpx.post(gw2.url + "/v1/chat/completions", json={"model": "m", "messages": []}, headers=auth, timeout=10)
    assert r.status_code == 503 and "[ccx: redacted]" in r.text and UPSTREAM_KEYS[0] not in r.text

    gw.stop()
    gw2.stop()
    saved = flows_file.read_bytes() + (tmp_path / "flows2.mitm").read_bytes()
    logs = gw.log() + gw2.log()
    assert b"/v1/chat/completions" in saved and "| key good#" in logs  # the files do hold the traffic
    for secret in (PROXY_KEY, *UPSTREAM_KEYS):
        assert secret.encode() not in saved, secret
        assert secret not in logs, secret
    # The upstreams did get the real keys.
    assert {r.headers["authorization"] for r in good.received} == {f"Bearer {UPSTREAM_KEYS[1]}", f"Bearer {UPSTREAM_KEYS[2]}"}


def test_saved_flows_read_back_with_the_gateway_comments(mitmdump, upstreams, tmp_path):
    from mitmproxy import io

    up = upstreams()
    flows_file = tmp_path / "flows.mitm"
    gw = mitmdump(config(channel("main", up.url + "/v1", extra="model_mapping: {gpt: up-model}")), "-w", str(flows_file))
    httpx.post(gw.url + "/v1/chat/completions", json={"model": "gpt-5", "stream": True, "messages": []},
               headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10)
    gw.stop()
    with flows_file.open("rb") as f:
        flows = [fl for fl in io.FlowReader(f).stream() if fl.request.path.endswith("/chat/completions")]
    [flow] = flows
    assert flow.comment.startswith("✓ main | gpt-5→up-model | 200 stream")
    assert flow.request.url == up.url + "/v1/chat/completions"
    assert json.loads(flow.request.content)["model"] == "up-model"
    assert b"data: [DONE]" in flow.response.content
    assert flow.metadata["ccx"]["channel"] == "main"
