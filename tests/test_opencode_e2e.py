"""The real OpenCode CLI (npm `opencode-ai`, pinned in tests/opencode/package.json) against
the gateway, which forwards to fake upstreams on 127.0.0.1.

Install it with `(cd tests/opencode && npm install --no-package-lock)` (.ci/run does). Without it these tests
skip, except under CI (env var CI set), where a missing binary is a failure.
OpenCode runs isolated: fresh HOME and XDG dirs, a generated config, no network but loopback.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ccx_addon.access import WRONG_KEY_HINT
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import Received, chunk_events, json_answer, sse_answer

OPENCODE = Path(__file__).resolve().parent / "opencode" / "node_modules" / ".bin" / "opencode"
RUN_TIMEOUT = 90  # seconds per OpenCode run; it is killed (with its children) after that
MAPPING = "model_mapping: {gpt: up-model}"  # OpenCode asks for gpt-5; upstreams see up-model
PROMPT = ("say", "hi")  # separate words: a quoted string would be sent with its quotes


@pytest.fixture(scope="module")
def opencode() -> Path:
    if not os.access(OPENCODE, os.X_OK):
        reason = f"OpenCode CLI not installed at {OPENCODE}: run (cd tests/opencode && npm install --no-package-lock)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(reason + " (CI is set: this test must not be skipped)", pytrace=False)
        pytest.skip(reason)
    return OPENCODE


class Run:
    def __init__(self, returncode: int, stdout: str, stderr: str, seconds: float) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds
        self.events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind]

    @property
    def text(self) -> str:
        return "".join(e["part"]["text"] for e in self.of_type("text"))

    def __repr__(self) -> str:  # shown by pytest when an assertion fails
        return f"<opencode rc={self.returncode} {self.seconds:.1f}s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-3000:]}>"


@pytest.fixture
def run_opencode(opencode, tmp_path):
    """`run_opencode(base_url, api_key)`: `opencode run --format json say hi` in an isolated
    work dir (`tmp_path / "work"`, created before the run)."""
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"

    def run(base_url: str, api_key: str = PROXY_KEY) -> Run:
        config_path = tmp_path / "opencode.json"
        config_path.write_text(json.dumps({
            "$schema": "https://opencode.ai/config.json",
            "provider": {"ccx": {
                "npm": "@ai-sdk/openai-compatible", "name": "CCX",
                "options": {"baseURL": base_url + "/v1", "apiKey": api_key},
                "models": {"gpt-5": {"name": "gpt-5"}},
            }},
            "model": "ccx/gpt-5",
        }))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            "TMPDIR": str(tmp_path),
            "OPENCODE_CONFIG": str(config_path),
            "OPENCODE_DISABLE_MODELS_FETCH": "1",
            "OPENCODE_DISABLE_AUTOUPDATE": "1",
            "OPENCODE_DISABLE_SHARE": "1",
            "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
            "npm_config_registry": "http://127.0.0.1:9/",
            "NO_PROXY": "*",
        }
        argv = [str(opencode), "run", "--pure", "--title", "t", "--format", "json", "--model", "ccx/gpt-5", *PROMPT]
        started = time.monotonic()
        process = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"OpenCode did not finish within {RUN_TIMEOUT}s:\n{stdout.decode(errors='replace')}\n{stderr.decode(errors='replace')[-3000:]}")
        return Run(process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace"), time.monotonic() - started)

    run.work = work
    return run


def tool_call_events(model: str, call_id: str, name: str, arguments: str, pieces: int = 3) -> list[bytes]:
    """A streamed tool call as OpenAI sends it: id and name first, arguments in fragments."""
    def ev(delta, finish=None):
        payload = {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    size = -(-len(arguments) // pieces)
    events = [ev({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}]})]
    events += [ev({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + size]}}]})
               for i in range(0, len(arguments), size)]
    events.append(ev({}, "tool_calls"))
    events.append(b'data: {"id": "chatcmpl-tool", "object": "chat.completion.chunk", "created": 1, "model": "'
                  + model.encode() + b'", "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}\n\n')
    events.append(b"data: [DONE]\n\n")
    return events


def chat_flows(gw) -> list:
    """The gateway's flows for chat requests (not the harness's /health probes)."""
    return [f for f in gw.flows if f.request.path.endswith("/chat/completions")]


def assert_opencode_request(received: Received, key: str = UPSTREAM_KEYS[0]) -> dict:
    """What every upstream request from OpenCode must look like after the gateway."""
    assert received.method == "POST" and received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {key}"
    assert PROXY_KEY not in json.dumps(received.headers)
    assert received.headers["user-agent"].startswith("opencode/1.18.33 ")
    body = received.json
    assert body["model"] == "up-model"  # gpt-5 mapped by the channel's model_mapping
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["tool_choice"] == "auto"
    tools = {t["function"]["name"] for t in body["tools"]}
    assert {"read", "bash", "glob"} <= tools
    assert body["messages"][0]["role"] == "system" and len(body["messages"][0]["content"]) > 1000
    # Only the model changed: the rest of OpenCode's ~30 KB body arrived byte for byte.
    assert len(received.body) > 10_000
    assert b'"model":"up-model"' in received.body or b'"model": "up-model"' in received.body
    return body


def test_plain_streamed_reply(gateway, upstreams, run_opencode):
    up = upstreams(lambda r: sse_answer(chunk_events(r.json["model"], ["Hello", " from", " the fake", " upstream 7c1"])))
    gw = gateway(config(channel("main", up.url + "/v1", extra=MAPPING)))

    run = run_opencode(gw.url)

    assert run.returncode == 0, run
    assert run.text == "Hello from the fake upstream 7c1", run
    assert not run.of_type("error"), run
    [finish] = run.of_type("step_finish")
    assert finish["part"]["reason"] == "stop"
    assert finish["part"]["tokens"]["output"] == 4  # the usage chunk reached OpenCode
    [received] = up.received
    body = assert_opencode_request(received)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][-1]["content"] == " ".join(PROMPT)
    [flow] = chat_flows(gw)
    assert flow.response.status_code == 200 and flow.response.headers["x-ccx-channel"] == "main"


def test_streamed_tool_call_is_executed_and_followed_up(gateway, upstreams, run_opencode):
    secret_file = run_opencode.work / "notes.txt"
    secret_file.write_text("the magic word is xyzzy-4411\n")
    call_id = "call_ccx_read_1"
    arguments = json.dumps({"filePath": str(secret_file)})

    def behaviour(received: Received):
        model = received.json["model"]
        if any(m.get("role") == "tool" for m in received.json["messages"]):
            return sse_answer(chunk_events(model, ["The file", " says xyzzy."]))
        return sse_answer(tool_call_events(model, call_id, "read", arguments))

    up = upstreams(behaviour)
    gw = gateway(config(channel("main", up.url + "/v1", extra=MAPPING)))

    run = run_opencode(gw.url)

    assert run.returncode == 0, run
    [tool_use] = run.of_type("tool_use")
    assert tool_use["part"]["tool"] == "read" and tool_use["part"]["callID"] == call_id, run
    assert tool_use["part"]["state"]["status"] == "completed", run
    assert "xyzzy-4411" in tool_use["part"]["state"]["output"]
    assert run.text == "The file says xyzzy.", run
    assert [e["part"]["reason"] for e in run.of_type("step_finish")] == ["tool-calls", "stop"], run

    assert len(up.received) == 2
    first = assert_opencode_request(up.received[0])
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    follow_up = assert_opencode_request(up.received[1])
    roles = [m["role"] for m in follow_up["messages"]]
    assert roles == ["system", "user", "assistant", "tool"], roles
    assistant, tool = follow_up["messages"][2:]
    [call] = assistant["tool_calls"]
    assert call["id"] == call_id and call["type"] == "function"
    assert call["function"]["name"] == "read"
    assert json.loads(call["function"]["arguments"]) == {"filePath": str(secret_file)}
    assert tool["tool_call_id"] == call_id
    tool_content = tool["content"] if isinstance(tool["content"], str) else json.dumps(tool["content"])
    assert "xyzzy-4411" in tool_content
    assert [f.response.status_code for f in chat_flows(gw)] == [200, 200]


def test_wrong_proxy_key_shows_our_401_message_without_retrying(gateway, upstreams, run_opencode):
    up = upstreams()
    gw = gateway(config(channel("main", up.url + "/v1", extra=MAPPING)))

    run = run_opencode(gw.url, api_key="sk-not-the-proxy-key")

    assert run.returncode != 0, run
    assert run.text == "", run
    # OpenCode shows the gateway's error.message as it is.
    [error] = run.of_type("error")
    assert error["error"]["data"]["statusCode"] == 401, run
    assert error["error"]["data"]["isRetryable"] is False, run
    assert error["error"]["data"]["message"] == "Invalid proxy access key. " + WRONG_KEY_HINT, run
    assert "PROXY_ACCESS_KEY" in WRONG_KEY_HINT
    assert up.received == []
    # One request, one 401: OpenCode did not retry.
    assert [f.response.status_code for f in chat_flows(gw)] == [401]
    assert run.seconds < 30, run


def test_503_on_first_channel_is_served_by_second_without_opencode_retrying(gateway, upstreams, run_opencode):
    failing = upstreams(lambda r: json_answer(503, {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}))
    healthy = upstreams(lambda r: sse_answer(chunk_events(r.json["model"], ["served", " by", " second"])))
    gw = gateway(config(
        channel("first", failing.url + "/v1", keys=(UPSTREAM_KEYS[0],), extra=MAPPING),
        channel("second", healthy.url + "/v1", keys=(UPSTREAM_KEYS[1],), extra=MAPPING),
    ))

    run = run_opencode(gw.url)

    assert run.returncode == 0, run
    assert run.text == "served by second", run
    assert not run.of_type("error"), run
    # One OpenCode request: the first channel saw it once, the second served it.
    [to_first] = failing.received
    [to_second] = healthy.received
    assert_opencode_request(to_first, key=UPSTREAM_KEYS[0])
    assert_opencode_request(to_second, key=UPSTREAM_KEYS[1])
    assert to_first.body == to_second.body
    [flow] = chat_flows(gw)
    assert flow.response.status_code == 200 and flow.response.headers["x-ccx-channel"] == "second"
    assert "after first" in flow.comment
    assert run.seconds < 30, run  # OpenCode's own retry would add 2 s x 2^n delays
