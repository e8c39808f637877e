"""The loopback hand-over: how an upstream stream the addon opened itself reaches the client
through mitmproxy, event by event.

The `request` hook registers the opened upstream response under a random token and
retargets the flow to this server on 127.0.0.1; mitmproxy connects here like to any
upstream, and this server replays the upstream's status and headers and pipes the body as
it arrives. So mitmproxy's streaming, hooks and flow view keep working, while failover has
already happened before the first byte went out.
"""

import asyncio
import dataclasses
import logging
import secrets
from collections.abc import Callable
from typing import Protocol

import aiohttp

from .encodings import DecodeError
from .sse import error_event
from .upstream import BrokenBody, read_chunk

logger = logging.getLogger(__name__)

TOKEN_HEADER = "x-ccx-handover"
_TOKEN_HEADER_BYTES = TOKEN_HEADER.encode()
# A response nobody collects (the client left before mitmproxy connected here) is closed.
UNCLAIMED_TTL = 30.0
_MAX_HEAD = 256 * 1024


class StreamTransform(Protocol):
    """One step of the chain a handed-over body passes through, in order (scrubbing,
    reasoning capture, usage-chunk removal, ...). Chunks are transport chunks, not SSE
    events: a step that works on events keeps the incomplete rest itself. Every step must
    pass bytes on as soon as it can: streams are never held back."""

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send on for `chunk` (possibly empty, possibly including held-back ones)."""

    def end(self) -> bytes:
        """The upstream ended (normally or not): whatever is still held back."""


def run_transforms(transforms, chunk: bytes, final: bool = False) -> bytes:
    """`chunk` through every transform in order; with `final`, each one's held-back rest
    is flushed into the next."""
    for transform in transforms:
        chunk = transform.feed(chunk) if chunk else b""
        if final:
            chunk += transform.end()
    return chunk


@dataclasses.dataclass
class PendingStream:
    response: aiohttp.ClientResponse
    status: int
    reason: str
    headers: list[tuple[str, str]]
    idle_timeout: float | None
    # Called once when the stream ends: None on success, else a short reason.
    on_end: Callable[[str | None], None] = lambda reason: None
    transforms: list[StreamTransform] = dataclasses.field(default_factory=list)
    # Body bytes already read from `response` (e.g. to judge the first event before
    # choosing to serve this stream): sent first.
    first: bytes = b""
    expiry: asyncio.TimerHandle | None = None


@dataclasses.dataclass
class CannedAnswer:
    """A whole HTTP response, for a request refused from its headers alone (access.py)."""

    raw: bytes
    expiry: asyncio.TimerHandle | None = None


class HandoverServer:
    def __init__(self) -> None:
        self.pending: dict[str, PendingStream | CannedAnswer] = {}
        self._server: asyncio.Server | None = None
        self.port = 0
        self._pumps: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self._server is None:
            # mitmproxy opens one connection here per stream starting: a burst of streams
            # must not overflow the default backlog (100) and wait for SYN retries.
            self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0, backlog=1024)
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for token in list(self.pending):
            self._expire(token)
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._pumps):
            task.cancel()

    def register(self, stream: "PendingStream | CannedAnswer") -> str:
        token = secrets.token_urlsafe(18)
        self.pending[token] = stream
        stream.expiry = asyncio.get_running_loop().call_later(UNCLAIMED_TTL, self._expire, token)
        return token

    def register_answer(self, raw: bytes) -> str:
        """Serve `raw` to the request that brings the returned token, without reading its body."""
        return self.register(CannedAnswer(raw))

    def cancel(self, token: str) -> None:
        """Drop what `token` would have served (its flow got another answer)."""
        self._expire(token)

    def _expire(self, token: str) -> None:
        stream = self.pending.pop(token, None)
        if stream is not None:
            if stream.expiry:
                stream.expiry.cancel()
            if isinstance(stream, PendingStream):
                stream.response.close()
                stream.on_end("not collected: the client left before the stream started")

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._pumps.add(task)
        try:
            carry = b""
            while (carry := await self._serve_one(reader, writer, carry)) is not None:
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._pumps.discard(task)
            writer.close()

    async def _serve_one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, carry: bytes
    ) -> bytes | None:
        """Serve one request. Returns bytes already read of the next request, or None when
        the connection should close."""
        try:
            head = carry + await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        token, length = _parse_head(head)
        stream = self.pending.pop(token, None) if token else None
        if isinstance(stream, CannedAnswer):
            # mitmproxy streams the body of such a request away: nothing of it comes here.
            stream.expiry.cancel()
            writer.write(stream.raw)
            return b""
        if length:
            await reader.readexactly(length)  # the body already went upstream
        if stream is None:
            writer.write(
                b"HTTP/1.1 410 Gone\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n"
            )
            return b""
        if stream.expiry:
            stream.expiry.cancel()
        return await self._pipe(stream, reader, writer)

    async def _pipe(
        self, stream: PendingStream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        head = [f"HTTP/1.1 {stream.status} {stream.reason}\r\n".encode()]
        for name, value in stream.headers:
            head.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        head.append(b"transfer-encoding: chunked\r\n\r\n")
        writer.write(b"".join(head))

        # mitmproxy sends nothing more on this connection until the response ends, so any
        # read result here means it closed it: the client went away.
        client_gone = asyncio.ensure_future(reader.read(1))
        pump = asyncio.ensure_future(self._pump_body(stream, writer))
        # A client that leaves mid-stream resets this connection: the read then fails too.
        # Expected, so retrieved here (else asyncio logs "Unhandled error in task" for each).
        client_gone.add_done_callback(_retrieve)
        pump.add_done_callback(_retrieve)
        try:
            await asyncio.wait((pump, client_gone), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pump.cancel()
            client_gone.cancel()
            stream.response.close()
            stream.on_end("gateway shutting down")
            raise
        if not pump.done() or pump.exception() is not None:
            # Either mitmproxy closed the connection (the client went away) or writing to
            # it failed: stop the paid generation at once.
            pump.cancel()
            stream.response.close()
            stream.on_end("client disconnected mid-stream")
            return None
        if client_gone.done():
            # mitmproxy may already have started its next request on this connection.
            first = client_gone.result()
            return first if first else None
        client_gone.cancel()
        await asyncio.wait((client_gone,))
        return b""

    async def _pump_body(self, stream: PendingStream, writer: asyncio.StreamWriter) -> None:
        tail = b"\n\n"  # the last two bytes sent, to end a cut event before an error event
        last = b""
        failure = None
        pending, stream.first = stream.first, b""
        while True:
            try:
                if pending:
                    chunk, pending = pending, b""
                else:
                    chunk = await read_chunk(stream.response, stream.idle_timeout)
            except TimeoutError:
                failure = f"upstream sent nothing for {stream.idle_timeout:g}s"
                break
            except BrokenBody as e:
                failure = f"upstream broke off the stream: {e}"
                break
            except (aiohttp.ClientError, OSError) as e:
                failure = f"upstream connection broke mid-stream ({type(e).__name__})"
                break
            try:
                if not chunk:
                    if stream.transforms and (rest := run_transforms(stream.transforms, b"", final=True)):
                        writer.write(b"%x\r\n%b\r\n" % (len(rest), rest))
                        tail = (tail + rest)[-2:]
                    if not _framed(stream.response.headers) and b"[DONE]" not in last:
                        # Without chunking or a length, a reset reads as a normal end: only the
                        # missing [DONE] tells a cut stream from a complete one.
                        failure = "upstream closed the connection before the end of the stream"
                    break
                last = (last + chunk)[-64:]
                if stream.transforms:
                    chunk = run_transforms(stream.transforms, chunk)
            except DecodeError as e:
                failure = str(e)
                break
            if not chunk:
                continue
            writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            tail = (tail + chunk)[-2:]
            await writer.drain()
        if failure is not None:
            if stream.transforms and (rest := _flush(stream.transforms)):
                writer.write(b"%x\r\n%b\r\n" % (len(rest), rest))
                tail = (tail + rest)[-2:]
            stream.response.close()
            message = f"The upstream stream was interrupted: {failure}. The answer above is incomplete."
            # End a half-sent event first, so the error arrives as an event of its own.
            data = (b"" if tail == b"\n\n" else b"\n\n") + error_event(
                message, "upstream_error", "stream_interrupted"
            )
            writer.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            stream.response.release()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        stream.on_end(failure)


def _flush(transforms) -> bytes:
    """What the transforms still hold after a failed stream (nothing when one of them
    cannot make sense of it)."""
    try:
        return run_transforms(transforms, b"", final=True)
    except DecodeError:
        return b""
def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _framed(headers) -> bool:
    """Whether the upstream's body has an explicit end (chunked, or a Content-Length)."""
    return "chunked" in headers.get("transfer-encoding", "").lower() or "content-length" in headers


def _parse_head(head: bytes) -> tuple[str | None, int]:
    token = None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == _TOKEN_HEADER_BYTES:
            token = value.strip().decode("ascii", "replace")
        elif name == b"content-length":
            length = int(value.strip() or 0)
    return token, length
