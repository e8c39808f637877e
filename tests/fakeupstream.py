"""A fake OpenAI-compatible upstream on 127.0.0.1 that records what it receives and
answers (or misbehaves) as each test scripts it.

It speaks raw HTTP/1.1 over asyncio in a background thread, so a test can make it reset a
connection, stall before headers, go idle mid-stream or send a broken body exactly.
"""

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


# An answer is a list of steps: ("send", bytes) | ("sleep", seconds) | ("reset",)
# | ("close",) | ("hang",). Helpers below build the usual ones.
Steps = list[tuple]


def http_head(status: int, headers: dict[str, str] | None = None, reason: str = "X") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def json_answer(status: int, payload: Any, headers: dict[str, str] | None = None) -> Steps:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    all_headers = {"content-type": "application/json", "content-length": str(len(body))}
    all_headers.update(headers or {})
    return [("send", http_head(status, all_headers) + body)]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def sse_answer(events: list[bytes], delay: float = 0.0, headers: dict[str, str] | None = None) -> Steps:
    all_headers = {"content-type": "text/event-stream", "transfer-encoding": "chunked"}
    all_headers.update(headers or {})
    steps: Steps = [("send", http_head(200, all_headers))]
    for event in events:
        if delay:
            steps.append(("sleep", delay))
        steps.append(("send", chunk(event)))
    steps.append(("send", b"0\r\n\r\n"))
    return steps


def completion(model: str, text: str = "hello from upstream", usage: bool = True) -> dict:
    out = {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }
    if usage:
        out["usage"] = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    return out


def chunk_events(model: str, pieces: list[str], usage: bool = True) -> list[bytes]:
    def ev(payload):
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}
    events = [ev({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})]
    events += [ev({**base, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}) for p in pieces]
    events.append(ev({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if usage:
        events.append(ev({**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": len(pieces), "total_tokens": 11 + len(pieces)}}))
    events.append(b"data: [DONE]\n\n")
    return events


def openai_like(received: Received) -> Steps:
    """The default behaviour: a well-formed answer for the model it was sent."""
    try:
        request = received.json
    except ValueError:
        return json_answer(400, {"error": {"message": "bad json", "type": "invalid_request_error", "param": None, "code": None}})
    model = request.get("model", "?")
    if request.get("stream"):
        return sse_answer(chunk_events(model, ["hello", " from", " upstream"]))
    return json_answer(200, completion(model))


class FakeUpstream:
    def __init__(self, behaviour: Callable[[Received], Steps] = openai_like, ssl_context=None) -> None:
        """`ssl_context`: serve HTTPS with it (a server-side ssl.SSLContext)."""
        self.behaviour = behaviour
        self.ssl_context = ssl_context
        self.received: list[Received] = []
        self.connections = 0
        self.aborted = 0  # answers cut short because the peer went away
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    @property
    def chats(self) -> list[Received]:
        """The chat requests received: preset channels also fetch GET /models in the
        background (the /v1/models catalog), at a moment no test controls."""
        return [r for r in self.received if r.method == "POST" and r.path.endswith("/chat/completions")]

    def start(self) -> "FakeUpstream":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", 0, backlog=1024, ssl=self.ssl_context,  # backlog: load tests
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close():
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "FakeUpstream":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.time() + timeout
        while len(self.received) < count and time.time() < deadline:
            time.sleep(0.01)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                        body += (await reader.readexactly(size + 2))[:-2]
                        if size == 0:
                            break
                received = Received(method, path, headers, body)
                self.received.append(received)
                if not await self._play(self.behaviour(received), reader, writer):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()

    async def _play(self, steps: Steps, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Run the steps; False when the connection must not be reused."""
        try:
            for step in steps:
                kind = step[0]
                if kind == "send":
                    writer.write(step[1])
                    await writer.drain()
                elif kind in ("sleep", "hang"):
                    # Wait, but notice at once when the peer goes away (the gateway
                    # cancelling the request): that is what tests of cancellation check.
                    try:
                        data = await asyncio.wait_for(reader.read(1), step[1] if kind == "sleep" else 3600)
                    except asyncio.TimeoutError:
                        continue
                    if not data:
                        self.aborted += 1
                        return False
                elif kind == "reset":
                    writer.transport.abort()
                    return False
                elif kind == "close":
                    await writer.drain()
                    writer.close()
                    return False
        except (ConnectionError, OSError):
            self.aborted += 1
            return False
        return True
