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
from .body import BodyError, ChatRequest, parse_chat_request
from .encodings import StreamDecoder, encodings_of
from .errors import display_text
from .flowsummary import SESSION_HEADERS
from .forwarding import Attempt, Forwarder, ForwardResult
from .handover import TOKEN_HEADER, HandoverServer, PendingStream
from .health import HealthRegistry
from .modelrewrite import ModelRewrite, first_model, rewrite_buffered
from .reasoning import ReasoningObserver, capture_completion
from .redact import StreamScrubber, scrub_bytes, scrub_headers
from .requestcheck import decode_body
from .rewrite import fixes_for, image_refusals
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


_SESSION_FIELDS = tuple(name.encode() for name in SESSION_HEADERS)


def client_session_id(headers: http.Headers) -> str:
    """The client's whole session id (`x-session-id`, else `x-session-affinity`), which binds
    the session to a key. Only its short label is ever shown. One pass over the raw fields:
    `headers.get` of an absent name raises and catches a KeyError inside, and two of those
    cost ~8 µs, which every request without a session id would pay (bench/affinity.py)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers.fields:
        name = name.lower()
        if name in _SESSION_FIELDS:
            found.setdefault(name, value)
    for name in _SESSION_FIELDS:
        if value := found.get(name, b"").strip():
            return value.decode("utf-8", "surrogateescape")
    return ""


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
        self.handover = state.handover = HandoverServer()
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
        """The chat endpoint, step by step: parse, plan, forward (with failover), deliver."""
        record = self.state.records.get(flow)
        if record is None or flow.response or record.endpoint != "chat" or record.rejected:
            return
        config, health = self.state.config, self.state.health
        if (parsed := self.parse(flow, record)) is None:
            return
        chat, body = parsed
        if (planned := self.plan(flow, record, config, chat)) is None:
            return
        plan, image_skips = planned
        session = health.session_choice(client_session_id(flow.request.headers), time.time())
        result = await self.forward(flow, record, config, health, plan, chat, body, session)
        if result is None:
            return
        # Channels left out for the request's images show in the attempt record.
        result.attempts[:0] = [Attempt(name, "-", model, f"skipped: {why}") for name, model, why in image_skips]
        if session is not None:
            result.affinity = session.note
        record.result = result
        self.deliver(flow, record, result, config, health, chat.model)

    def parse(self, flow: http.HTTPFlow, record: FlowRecord) -> tuple[ChatRequest, bytes] | None:
        """The client's body, decoded and parsed; None when refused (answered already)."""
        # Decoded here, capped: mitmproxy's own `content` would inflate a gzip bomb whole.
        # A refusal (415, 400, 413) raises RequestRefused, which the guard answers.
        body = decode_body(flow.request.raw_content or b"", flow.request.headers.get("content-encoding", ""),
                           self.state.max_body_size)
        try:
            chat = parse_chat_request(body)
        except BodyError as e:
            reject(flow, record, 400, str(e), e.code, e.param)
            return None
        record.requested_model = display_text(chat.model)
        record.stream = chat.stream
        record.usage_requested = chat.stream and client_asked_for_usage(body)
        return chat, body

    @staticmethod
    def plan(flow: http.HTTPFlow, record: FlowRecord, config, chat: ChatRequest) -> tuple | None:
        """(the channels to try, the ones its images rule out), or None when no channel can
        serve (answered already: 404 model_not_found, 400 images_not_supported)."""
        # A replay goes to the channel its flow shows (replay.py).
        plan = pinned_plan(record.pinned_channel, chat.model) if record.pinned_channel else plan_routes(config, chat.model)
        if not plan.routes:
            reject(flow, record, 404, model_not_found_message(chat.model, plan.describe_skipped()),
                   "model_not_found", "model")
            return None
        plan, image_skips = image_refusals(plan, chat)
        if not plan.routes:
            reject(flow, record, 400, images_refused_message(chat.model, image_skips),
                   "images_not_supported", "messages")
            return None
        return plan, image_skips

    async def forward(self, flow, record, config, health, plan, chat, body, session) -> ForwardResult | None:
        """The attempt loop, in this task; None when the client left meanwhile (the client
        watch cancels the task, and the upstream request with it)."""
        task = asyncio.current_task()
        self.client_watch.add(task, flow, record)
        try:
            return await self.forwarder.forward(
                config, health, plan, chat, body, flow.request.headers.items(multi=True), session,
            )
        except asyncio.CancelledError:
            if not record.client_gone:
                raise  # cancelled from elsewhere (shutdown)
            task.uncancel()
            flow.kill()
            return None
        finally:
            self.client_watch.discard(task)

    def deliver(self, flow, record, result: ForwardResult, config, health, requested_model: str) -> None:
        """Show what went upstream, then answer: a buffered answer at once, a stream over
        the hand-over (with reasoning capture and the model rewrite where configured)."""
        self.show_upstream_request(flow, result, config.secrets)
        transforms = self.capture_reasoning(result)
        rewrite_to = requested_model if result.ok and result.route and config.rewrites_model(result.route.channel) else None
        if result.stream is not None:
            self.hand_over(flow, record, result, health, config.secrets, transforms, rewrite_to)
            return
        if rewrite_to is not None:
            rewrite_answer_model(result, rewrite_to)
        self.respond(flow, result, config.secrets)

    def capture_reasoning(self, result: ForwardResult) -> list:
        """For channels with reasoning passback: remember the answer's reasoning_content, at
        once for a buffered answer, and for a stream as it passes (the stream transforms
        returned here; they never hold back a byte)."""
        route = result.route
        if route is None or not result.ok:
            return []
        spec = fixes_for(route.channel, route.upstream_model)
        if spec is None or not spec.passback:
            return []
        if result.stream is None:
            capture_completion(self.forwarder.reasoning, route.channel.name, result.body or b"")
            return []
        return [ReasoningObserver(self.forwarder.reasoning, route.channel.name)]

    def show_upstream_request(self, flow: http.HTTPFlow, result: ForwardResult, secrets: tuple[str, ...] = ()) -> None:
        """Make the flow show the request as the serving upstream received it, with keys
        masked: the channel's key, its secret headers, credentials in its base_url."""
        if result.route is None or result.route.channel.is_echo:
            return
        channel = result.route.channel
        # What `flow.request.url = result.upstream_url` does, minus parsing the URL again.
        scheme, host, port, path, netloc = _upstream_target(result.upstream_url)
        flow.request.scheme, flow.request.host, flow.request.port, flow.request.path = scheme, host, port, path
        headers = upstream_request_headers(flow.request.headers.items(multi=True), channel, SECRET_MASK)
        flow.request.headers = _headers(scrub_headers(headers.items(), secrets))
        flow.request.host_header = netloc
        flow.request.raw_content = result.sent_body
        if "content-length" in flow.request.headers or result.sent_body:
            flow.request.headers["content-length"] = str(len(result.sent_body))

    def respond(self, flow: http.HTTPFlow, result: ForwardResult, secrets: tuple[str, ...] = ()) -> None:
        """`secrets`: the keys of the config the request started with, which a reload may
        have replaced since (the config in force is scrubbed too)."""
        # Errors and successes alike: a 200 may quote a key too (item 6 of issue 9).
        body = self.state.scrub(scrub_bytes(result.body or b"", secrets))
        headers = [(k, v) for k, v in self.scrubbed_headers(result.headers, secrets) if k.lower() != "content-length"]
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

    def scrubbed_headers(self, headers: list[tuple[str, str]], secrets: tuple[str, ...]) -> list[tuple[str, str]]:
        """Upstream response headers with the keys of the request's config and of the
        config in force masked (an upstream may echo a key in a header)."""
        return scrub_headers(headers, (*secrets, *(self.state.config.secrets if self.state.config else ())))

    def hand_over(
        self, flow: http.HTTPFlow, record: FlowRecord, result: ForwardResult, health: HealthRegistry,
        secrets: tuple[str, ...] = (), transforms: list | None = None, rewrite_to: str | None = None,
    ) -> None:
        """`health` is the registry the request started with: a reload since then may have
        installed one without this channel; `secrets`, that config's keys; `transforms`,
        steps after decoding and scrubbing; `rewrite_to`: the model every chunk names
        (rewrite_response_model)."""
        route = result.route

        def on_end(failure: str | None) -> None:
            if result.lease is not None:
                result.lease.release()  # the key's concurrency slot frees at the last byte
            record.stream_failure = failure
            if failure and "upstream" in failure:
                health.breaker(route.channel.name, result.upstream_url).record(False, time.time())

        headers = self.scrubbed_headers(result.headers, secrets) + gateway_headers(result)
        # Decoding and scrubbing first: later steps see plain, scrubbed bytes.
        steps = [
            *stream_transforms(result.stream.headers.get("content-encoding"), secrets),
            *(transforms or ()),
            *usage_transforms(record, route.channel),
        ]
        if rewrite_to is not None:
            steps.append(ModelRewrite(rewrite_to))
            if (original := first_model(result.stream_first)) is not None:
                headers.append(answer_model_header(original))
        token = self.handover.register(PendingStream(
            response=result.stream,
            status=result.status,
            reason=result.reason,
            headers=headers,
            idle_timeout=route.channel.timeouts.idle,
            on_end=on_end,
            transforms=steps,
            first=result.stream_first,
        ))
        record.handover_token = token
        # Retarget to the hand-over server; the Host header keeps naming the upstream.
        upstream_host = flow.request.host_header
        flow.request.scheme = "http"
        flow.request.host = "127.0.0.1"
        flow.request.port = self.handover.port
        flow.request.host_header = upstream_host
        flow.request.headers[TOKEN_HEADER] = token


def images_refused_message(model: str, refused: list[tuple[str, str, str]]) -> str:
    names = "; ".join(f"{name} ({upstream}): {why}" for name, upstream, why in refused)
    return (
        f"The request has image parts, and no channel for model {model!r} takes images: {names}. "
        f"Remove the images, or ask for a model served by a channel that takes them "
        f"(a channel's fixes.images, or its preset, says whether it does)."
    )
def stream_transforms(content_encoding: str | None, secrets: tuple[str, ...]) -> list:
    """The first steps every handed-over stream passes through: decode the upstream's
    content encoding (the client gets plain events, announced as such), then mask secrets
    (an error event may quote the key, split across two chunks). Later steps see plain,
    scrubbed bytes."""
    steps: list = [StreamDecoder(content_encoding)] if encodings_of(content_encoding) else []
    if secrets:
        steps.append(StreamScrubber(secrets))
    return steps
def answer_model_header(original: str) -> tuple[str, str]:
    """The model the upstream's answer named before rewrite_response_model replaced it:
    kept visible in the flow view (and to the client)."""
    return ("x-ccx-answer-model", header_value(original))


def rewrite_answer_model(result: ForwardResult, model: str) -> None:
    """A buffered answer names `model` (rewrite_response_model); the header keeps the
    upstream's own."""
    content_type = next((v for k, v in result.headers if k.lower() == "content-type"), "")
    result.body, original = rewrite_buffered(result.body or b"", content_type, model)
    if original is not None:
        result.headers = [*result.headers, answer_model_header(original)]
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
    # The Host header never shows credentials written into base_url (user:KEY@host).
    return (*mitmproxy_url.parse(upstream_url), urlsplit(upstream_url).netloc.rpartition("@")[2])


def _headers(pairs) -> http.Headers:
    return http.Headers([(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape")) for k, v in pairs])
