"""`POST /v1/chat/completions`: parse, route, forward with failover, hand the answer to
mitmproxy (buffered answers directly, streams over the loopback hand-over)."""

import asyncio
import functools
import gc
import logging
import time
from urllib.parse import urlsplit

from mitmproxy import ctx, http
from mitmproxy.connection import ConnectionState
from mitmproxy.net.http import url as mitmproxy_url

from . import legacylog
from .access import model_not_found_message, reject
from .body import BodyError, parse_chat_request
from .forwarding import Forwarder, ForwardResult
from .handover import TOKEN_HEADER, HandoverServer, PendingStream
from .health import HealthRegistry
from .redact import scrub_bytes
from .routing import pinned_plan, plan_routes
from .state import SECRET_MASK, FlowRecord, GatewayState
from .upstream import UpstreamClient, upstream_request_headers
from .usagechunk import UsageChunkRemover, client_asked_for_usage

logger = logging.getLogger(__name__)

# How often a pending upstream request checks whether its client is still connected.
CLIENT_CHECK_INTERVAL = 0.25

_gc_frozen = False


def freeze_startup_objects() -> None:
    """Once per process, move everything alive after start-up (mitmproxy, aiohttp, the
    config: ~100,000 objects that live as long as the process) out of the garbage
    collector's reach. Full collections then scan only newer objects: they took ~50 ms each
    under load, the gateway's p99 latency (README, "Performance")."""
    global _gc_frozen
    if not _gc_frozen:
        _gc_frozen = True
        gc.collect()
        gc.freeze()


def client_gone(flow: http.HTTPFlow) -> bool:
    # A replay's client is mitmproxy itself; the flow keeps the original's closed connection.
    return not flow.is_replay and not (flow.client_conn.state & ConnectionState.CAN_READ)


class ClientWatch:
    """Stops the upstream work of requests whose client went away: one timer checks every
    request in flight each CLIENT_CHECK_INTERVAL and cancels the request hook of those whose
    client left. Cheaper than a task and a timed wait per request (README, "Performance")."""

    def __init__(self) -> None:
        self._watched: dict[asyncio.Task, tuple[http.HTTPFlow, FlowRecord]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, task: asyncio.Task, flow: http.HTTPFlow, record: FlowRecord) -> None:
        self._watched[task] = (flow, record)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(CLIENT_CHECK_INTERVAL, self._check)

    def discard(self, task: asyncio.Task) -> None:
        self._watched.pop(task, None)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        for task, (flow, record) in list(self._watched.items()):
            if client_gone(flow):
                # Nobody is waiting for this answer: stop the upstream generation now.
                del self._watched[task]
                record.client_gone = True
                task.cancel()
        if self._watched:
            self._timer = asyncio.get_running_loop().call_later(CLIENT_CHECK_INTERVAL, self._check)


class ChatGateway:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.client = UpstreamClient()
        self.handover = HandoverServer()
        self.forwarder = Forwarder(self.client)
        self.client_watch = ClientWatch()
        self._log_filters: list = []

    async def running(self) -> None:
        await self.handover.start()
        freeze_startup_objects()
        if not self._log_filters:
            self._log_filters = legacylog.install(getattr(ctx, "master", None))

    async def done(self) -> None:
        legacylog.uninstall(self._log_filters)
        self.client_watch.stop()
        await self.handover.stop()
        await self.client.close()

    async def request(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is None or flow.response or record.endpoint != "chat":
            return
        config, health = self.state.config, self.state.health
        try:
            chat = parse_chat_request(flow.request.content or b"")
        except BodyError as e:
            reject(flow, record, 400, str(e), e.code, e.param)
            return
        record.requested_model = chat.model
        record.stream = chat.stream
        record.usage_requested = chat.stream and client_asked_for_usage(flow.request.raw_content or b"")

        # A replay goes to the channel its flow shows (replay.py).
        plan = pinned_plan(record.pinned_channel, chat.model) if record.pinned_channel else plan_routes(config, chat.model)
        if not plan.routes:
            reject(flow, record, 404, model_not_found_message(chat.model, plan.describe_skipped()),
                   "model_not_found", "model")
            return

        # Forward in this task; the client watch cancels it if the client leaves meanwhile.
        task = asyncio.current_task()
        self.client_watch.add(task, flow, record)
        try:
            result = await self.forwarder.forward(
                config, health, plan, chat, flow.request.raw_content or b"", flow.request.headers.items(multi=True),
            )
        except asyncio.CancelledError:
            if not record.client_gone:
                raise  # cancelled from elsewhere (shutdown)
            task.uncancel()
            flow.kill()
            return
        finally:
            self.client_watch.discard(task)
        record.result = result
        self.show_upstream_request(flow, result)
        if result.stream is not None:
            self.hand_over(flow, record, result, health)
        else:
            self.respond(flow, result, config.secrets)

    def show_upstream_request(self, flow: http.HTTPFlow, result: ForwardResult) -> None:
        """Make the flow show the request as the serving upstream received it, with keys masked."""
        if result.route is None or result.route.channel.is_echo:
            return
        channel = result.route.channel
        # What `flow.request.url = result.upstream_url` does, minus parsing the URL again.
        scheme, host, port, path, netloc = _upstream_target(result.upstream_url)
        flow.request.scheme, flow.request.host, flow.request.port, flow.request.path = scheme, host, port, path
        headers = upstream_request_headers(flow.request.headers.items(multi=True), channel, SECRET_MASK)
        flow.request.headers = _headers(headers.items())
        flow.request.host_header = netloc
        flow.request.raw_content = result.sent_body
        if "content-length" in flow.request.headers or result.sent_body:
            flow.request.headers["content-length"] = str(len(result.sent_body))

    def respond(self, flow: http.HTTPFlow, result: ForwardResult, secrets: tuple[str, ...] = ()) -> None:
        """`secrets`: the keys of the config the request started with, which a reload may
        have replaced since (the config in force is scrubbed too)."""
        body = result.body or b""
        if not result.ok:
            body = self.state.scrub(scrub_bytes(body, secrets))
        headers = [(k, v) for k, v in result.headers if k.lower() != "content-length"]
        headers.append(("content-length", str(len(body))))
        headers.extend(gateway_headers(result))
        if result.origin == "gateway":
            headers.append(("x-ccx-gateway", "local"))
        now = time.time()
        flow.response = http.Response(
            http_version=b"HTTP/1.1",
            status_code=result.status,
            reason=(result.reason or "").encode(),
            headers=_headers(headers),
            content=body,
            trailers=None,
            timestamp_start=now,
            timestamp_end=now,
        )

    def hand_over(
        self, flow: http.HTTPFlow, record: FlowRecord, result: ForwardResult, health: HealthRegistry
    ) -> None:
        """`health` is the registry the request started with: a reload since then may have
        installed one without this channel."""
        route = result.route

        def on_end(failure: str | None) -> None:
            record.stream_failure = failure
            if failure and "upstream" in failure:
                health.breakers[route.channel.name].record(False, time.time())

        token = self.handover.register(PendingStream(
            response=result.stream,
            status=result.status,
            reason=result.reason,
            headers=result.headers + gateway_headers(result),
            idle_timeout=route.channel.timeouts.idle,
            on_end=on_end,
            transforms=usage_transforms(record, route.channel),
        ))
        record.handover_token = token
        # Retarget to the hand-over server; the Host header keeps naming the upstream.
        upstream_host = flow.request.host_header
        flow.request.scheme = "http"
        flow.request.host = "127.0.0.1"
        flow.request.port = self.handover.port
        flow.request.host_header = upstream_host
        flow.request.headers[TOKEN_HEADER] = token


def usage_transforms(record: FlowRecord, channel) -> list:
    """A channel asked for usage on the client's behalf: take the extra chunk out again."""
    if not channel.stream_usage or record.usage_requested:
        return []
    return [UsageChunkRemover(lambda usage: setattr(record, "removed_usage", usage))]


def gateway_headers(result: ForwardResult) -> list[tuple[str, str]]:
    """Non-secret response headers that tell a client (or curl user) who served it."""
    attempts = ("x-ccx-attempts", str(len(result.tries)))
    if result.route is None:
        return [attempts]
    return [
        ("x-ccx-channel", result.route.channel.name),
        ("x-ccx-upstream-model", header_value(result.route.upstream_model)),
        attempts,
    ]


def header_value(text: str) -> str:
    """`text` (a client-chosen model name) made safe for a header: anything but printable
    ASCII is percent-encoded, so a name cannot add header lines or break the encoding."""
    return "".join(
        c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in text
    )


@functools.lru_cache(maxsize=64)
def _upstream_target(upstream_url: str) -> tuple:
    """mitmproxy's parse of an upstream URL (scheme, host, port, path) and its netloc. Every
    flow shows one of a few URLs, and parsing one costs more than the rest of
    show_upstream_request (see README, "Performance")."""
    return (*mitmproxy_url.parse(upstream_url), urlsplit(upstream_url).netloc)


def _headers(pairs) -> http.Headers:
    return http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in pairs])
