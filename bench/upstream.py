"""A fast fake OpenAI-compatible upstream on 127.0.0.1: raw asyncio, pre-built answers.

Any POST gets a small chat.completion (Content-Length, keep-alive). A request whose
User-Agent says `events=N` gets an SSE answer of N chunk events (each its own HTTP chunk and
its own write), then a usage event and `data: [DONE]`; `pause-ms=M` pauses M ms after the
first event (to see whether a proxy holds events back). The User-Agent, because the gateway
forwards only allowlisted client headers (README, "What goes upstream").

Usage: python bench/upstream.py PORT   (prints "ready" when listening; stops on SIGTERM/stdin EOF)
"""

import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from payloads import COMPLETION, EVENT, LAST_EVENTS  # noqa: E402

JSON_ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
               b"x-request-id: bench\r\n\r\n" % len(COMPLETION)) + COMPLETION
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
EVENT_CHUNK = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
LAST_CHUNK = b"%x\r\n%b\r\n0\r\n\r\n" % (len(LAST_EVENTS), LAST_EVENTS)


def _header(head: bytes, name: bytes) -> int:
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return 0
    end = head.find(b"\r\n", i + 2)
    return int(head[i + len(name) + 3: end if end > 0 else None].strip() or 0)


def _bench_param(head: bytes, name: bytes) -> int:
    """`name=N` in the User-Agent line (lower-cased head)."""
    i = head.find(b"\r\nuser-agent:")
    if i < 0:
        return 0
    line = head[i + 2: head.find(b"\r\n", i + 2) if head.find(b"\r\n", i + 2) > 0 else None]
    j = line.find(b" " + name + b"=")
    return int(line[j + len(name) + 2:].split(b" ", 1)[0] or 0) if j >= 0 else 0


class Upstream(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        self.busy = None  # the task streaming an SSE answer
        self.can_write = asyncio.Event()
        self.can_write.set()

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def data_received(self, data):
        self.buf += data
        if self.busy is None:
            self._serve()

    def _serve(self):
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = _header(head, b"content-length")
            total = end + 4 + length
            if len(self.buf) < total:
                return
            self.buf = self.buf[total:]
            events = _bench_param(head, b"events")
            if not events:
                self.transport.write(JSON_ANSWER)
                continue
            self.busy = asyncio.ensure_future(self._stream(events, _bench_param(head, b"pause-ms")))
            return

    async def _stream(self, events, pause_ms):
        try:
            self.transport.write(SSE_HEAD + EVENT_CHUNK)
            await asyncio.sleep(pause_ms / 1000 if pause_ms else 0)
            for i in range(1, events):
                if not self.can_write.is_set():
                    await self.can_write.wait()
                self.transport.write(EVENT_CHUNK)
                await asyncio.sleep(0)  # every event leaves in a write of its own
            self.transport.write(LAST_CHUNK)
        finally:
            self.busy = None
        if not self.transport.is_closing():
            self._serve()

    def connection_lost(self, exc):
        self.can_write.set()
        if self.busy is not None:
            self.busy.cancel()


async def main(port: int):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
