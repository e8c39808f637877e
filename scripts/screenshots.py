"""Screenshots of mitmweb debugging an OpenCode-like session through the gateway, for the
README ("Debugging OpenCode with mitmweb"). Everything runs on 127.0.0.1: fake upstreams, a
real `mitmweb -s ccx_addon/addon.py`, headless Chromium (Debian: apt-get install chromium).

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots]
"""

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import httpx  # noqa: E402

from browser import filtered_page, mitmweb_page, screenshot  # noqa: E402
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config  # noqa: E402
from fakeupstream import FakeUpstream, chunk, http_head, json_answer, sse_answer  # noqa: E402
from webapi import WEB_PASSWORD, start_mitmweb  # noqa: E402

CHAT = "/v1/chat/completions"
SESSION = "ses_5b1e0c3a7ffeAbCdEfGh3f2a9c1d"
HEADERS = {"authorization": f"Bearer {PROXY_KEY}", "x-session-id": SESSION, "user-agent": "opencode/1.18"}


def ev(payload) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def delta(**fields) -> bytes:
    return ev({"id": "c1", "object": "chat.completion.chunk", "model": "deepseek-chat",
               "choices": [{"index": 0, "delta": fields, "finish_reason": None}]})


TOOL_STREAM = [
    delta(role="assistant", content=""),
    delta(reasoning_content="The user wants the failing test fixed; "),
    delta(reasoning_content="read the test file first."),
    delta(content="Let me look at the test."),
    delta(tool_calls=[{"index": 0, "id": "call_7", "type": "function", "function": {"name": "read", "arguments": ""}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": '{"filePath": "tests/'}}]),
    delta(tool_calls=[{"index": 0, "function": {"arguments": 'test_app.py"}'}}]),
    ev({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
    ev({"id": "c1", "object": "chat.completion.chunk", "choices": [],
        "usage": {"prompt_tokens": 5120, "completion_tokens": 48, "total_tokens": 5168}}),
    b"data: [DONE]\n\n",
]
SSE_HEAD = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})


def glm(received):
    return json_answer(503, {"error": {"message": "The service is overloaded, please try again later.", "type": "server_error",
                                       "param": None, "code": "1305"}}, {"x-request-id": "glm-20261126-0001"})


def deepseek(received):
    if received.json["messages"][-1].get("content") == "never mind":
        return [("send", SSE_HEAD + chunk(TOOL_STREAM[0]) + chunk(TOOL_STREAM[3])), ("hang",)]
    return sse_answer(TOOL_STREAM, delay=0.02)


def opencode_request(text: str) -> dict:
    return {
        "model": "gpt-5", "stream": True, "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are opencode, an interactive CLI coding agent."},
            {"role": "user", "content": "The test in tests/test_app.py fails. Fix it."},
            {"role": "assistant", "content": "I'll list the files.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "glob", "arguments": '{"pattern": "tests/*.py"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "tests/test_app.py"},
            {"role": "user", "content": text},
        ],
        "tools": [
            {"type": "function", "function": {"name": "read", "description": "Read a file from the local filesystem.",
                                              "parameters": {"type": "object", "required": ["filePath"], "properties": {
                                                  "filePath": {"type": "string"}, "offset": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "glob", "description": "Find files by pattern.",
                                              "parameters": {"type": "object", "required": ["pattern"], "properties": {
                                                  "pattern": {"type": "string"}}}}},
        ],
    }


def send_session(gw) -> None:
    post = lambda path, body, headers=HEADERS: httpx.post(gw.url + path, json=body, headers=headers, timeout=10)  # noqa: E731
    post(CHAT, opencode_request("Go on."))  # glm 503, then deepseek streams a tool call
    post(CHAT, opencode_request("Go on."), {**HEADERS, "authorization": "Bearer sk-a-provider-key"})  # wrong key
    post("/v1/responses", {"model": "gpt-5"})  # wrong provider type in the client
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:  # the user pressed Esc
        body = json.dumps(opencode_request("never mind")).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in HEADERS.items())
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: localhost\r\n{head}content-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"Let me look" not in received:
            received += sock.recv(65536)
    time.sleep(0.5)


def take(shots: dict, out: Path) -> None:
    for name, url in shots.items():
        screenshot(url, out / name)
        print(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    upstreams = [FakeUpstream(glm).start(), FakeUpstream(deepseek).start()]
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "ccx.yaml"
        path.write_text(config(
            channel("glm", upstreams[0].url + "/api/paas/v4", keys=(UPSTREAM_KEYS[0],)),
            channel("deepseek", upstreams[1].url, keys=(UPSTREAM_KEYS[1],), extra="model_mapping: {gpt: deepseek-chat}"),
        ))
        gw, api = start_mitmweb(path, Path(work))
        try:
            send_session(gw)
            flows = sorted(api.flows(), key=lambda f: f["timestamp_created"])
            served = next(f for f in flows if f["comment"].startswith("✓ deepseek"))
            attempt = next(f for f in flows if "| attempt: #" in f["comment"])
            token = WEB_PASSWORD  # every version asks for it (webauth.py on 11.0)
            shots = {
                "flow-list.png": mitmweb_page(gw.web_port, "/flows", token),
                "chat-response.png": mitmweb_page(gw.web_port, f"/flows/{served['id']}/response", token),
                "chat-request.png": mitmweb_page(gw.web_port, f"/flows/{served['id']}/request", token),
                "attempt-flow.png": mitmweb_page(gw.web_port, f"/flows/{attempt['id']}/response", token),
                "filter-failures.png": filtered_page(gw.web_port, "~comment failed | ~comment rejected", token),
            }
            take(shots, out)
            # Replay the served flow from mitmweb (as its Replay button does), then look again.
            api.post(f"/flows/{served['id']}/replay")
            time.sleep(1)
            take({"replayed.png": mitmweb_page(gw.web_port, f"/flows/{served['id']}/request", token)}, out)
            print(api.post("/commands/ccx.status").json()["value"])
        finally:
            gw.stop()
            api.client.close()
            for upstream in upstreams:
                upstream.stop()


if __name__ == "__main__":
    main()
