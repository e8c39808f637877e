"""Client-side helpers for the reliability tests: requests, SSE reading, raw sockets, and
looking at the gateway's flows and health from the test thread."""

import json
import socket
import time

import httpx

from conftest import PROXY_KEY

CHAT = "/v1/chat/completions"
AUTH = {"authorization": f"Bearer {PROXY_KEY}"}


def post(gw, body, headers=AUTH, timeout=30.0) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + CHAT, content=content,
                      headers={"content-type": "application/json", **headers}, timeout=timeout)


def ask(gw, stream: bool = False, model: str = "m", **kw) -> httpx.Response:
    return post(gw, {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}, **kw)


def error_of(response: httpx.Response) -> dict:
    payload = response.json()
    assert set(payload) == {"error"}, payload
    return payload["error"]


def events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded ("[DONE]" stays a string)."""
    out = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def streamed_text(payloads: list) -> str:
    return "".join(
        (p["choices"][0]["delta"].get("content") or "")
        for p in payloads if isinstance(p, dict) and p.get("choices")
    )


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def chat_flows(gw, count: int, timeout: float = 5.0) -> list:
    """The finished chat flows, once there are `count` (a streamed flow's `response` hook
    runs after the client already has the last byte)."""
    def flows():
        return [f for f in list(gw.flows) if f.request.path.endswith("/chat/completions")]
    wait_until(lambda: len(flows()) >= count, timeout)
    found = flows()
    assert len(found) >= count, [f.comment for f in found]
    return found


def health(gw) -> dict:
    from ccx_addon.access import AccessGate

    gate = gw.addon(AccessGate)
    return gw.call(gate.health_payload)["channels"]


def raw_request(gw, body: dict) -> socket.socket:
    """Send a chat request on a plain socket the test can close at any moment."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.sendall(
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {PROXY_KEY}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
