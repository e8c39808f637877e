"""The attempt loop: try the planned channels (and their keys) in order until one answers
in a way worth giving the client. Knows nothing of mitmproxy flows."""

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterable

import aiohttp

from .body import ChatRequest
from .caps import LearnedCaps, announced_cap, apply_cap, requested_output
from .config import Channel, GatewayConfig
from .echo import echo_reply
from .errors import error_body
from .health import CircuitBreaker, HealthRegistry, KeyPool, SessionChoice
from .keylimits import Lease
from .reasoning import ReasoningCache
from .redact import scrub_bytes, scrub_text
from .rewrite import build_attempt_body
from .routing import Route, RoutePlan
from .sse import completion_to_events, is_event_stream
from .upstream import (
    UpstreamClient, UpstreamError, parse_retry_after, response_headers_for_client,
    upstream_request_headers,
)
from .verdicts import (
    COOLDOWN, DISABLE, NEXT_CHANNEL, NEXT_KEY, REFUSE, SERVE, Verdict, first_event_data,
    judge_answer, judge_first_event,
)

# Error bodies and non-streamed answers are read whole; this bounds a runaway upstream.
MAX_BUFFERED_BODY = 64 * 1024 * 1024


@dataclasses.dataclass
class Attempt:
    channel: str
    key: str  # a label such as "deepseek#2", never the key
    upstream_model: str
    outcome: str  # "200", "503 overloaded", "cannot connect: ...", "skipped: ..."
    ok: bool = False
    fixes: tuple[str, ...] = ()  # labels of the request fixes this attempt's body got
    url: str = ""  # the chat completions URL the request went to ("" when skipped)
    # What the flow view shows of an attempt as a flow of its own (attemptflows.py): set
    # by note_request / note_answer, never a key (headers masked, bodies scrubbed, bounded).
    sent_body: bytes = b""
    started: float = 0.0
    ended: float = 0.0
    status: int | None = None
    reason: str = ""
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""

    @property
    def skipped(self) -> bool:
        """The channel or key was passed over without sending anything."""
        return self.outcome.startswith("skipped")


@dataclasses.dataclass
class ForwardResult:
    """What the client gets: a buffered answer (`body`) or an upstream stream to hand over."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes | None = None
    stream: aiohttp.ClientResponse | None = None
    route: Route | None = None
    key_label: str = ""
    upstream_url: str = ""
    sent_body: bytes = b""  # the request body as it went to the serving upstream
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    candidates: int = 0
    # "upstream": the upstream's answer as it was; "gateway": made here (errors, echo,
    # converted answers).
    origin: str = "upstream"
    # Body bytes of `stream` already read to judge its first event: sent first.
    stream_first: bytes = b""
    # The served stream's hold on its key (rpm/concurrency limits): released at its last byte.
    lease: Lease | None = None
    # Session affinity: how the last key was chosen for the client's session, e.g.
    # "→ pool#2", "→ pool#2 (new)", "→ pool#3 (moved from pool#2: cooling)"; "" without one.
    affinity: str = ""

    @property
    def fixes(self) -> tuple[str, ...]:
        """The request fixes the serving attempt's body got."""
        return self.attempts[-1].fixes if self.route is not None and self.attempts else ()

    @property
    def tries(self) -> list[Attempt]:
        """The attempts that really sent a request upstream."""
        return [a for a in self.attempts if not a.skipped]

    @property
    def served_by_failover(self) -> bool:
        return self.ok and any(not a.ok for a in self.attempts)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def gateway_error(status: int, message: str, type_: str, code: str, **extra) -> ForwardResult:
    headers = [("content-type", "application/json")]
    if (retry_after := extra.pop("retry_after", None)) is not None:
        headers.append(("retry-after", str(max(1, int(retry_after + 0.999)))))
    return ForwardResult(
        status=status, reason="", headers=headers, body=error_body(message, type_, code),
        origin="gateway", **extra,
    )


# How much of a stream is read, at most, to find its first event before serving it.
MAX_FIRST_EVENT = 256 * 1024
# The longest cooldown an upstream's own announcement (GLM 1308's reset time) may set.
MAX_ANNOUNCED_COOLDOWN = 7 * 24 * 3600.0


@dataclasses.dataclass
class AttemptRun:
    """One client request's walk through its candidates: what it may still spend and what
    it has learnt so far (attempts, the last upstream answer, when a resting key is back)."""

    config: GatewayConfig
    health: HealthRegistry
    plan: RoutePlan
    request: ChatRequest
    raw_body: bytes
    client_headers: list[tuple[str, str]]
    budget: int
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    caps: LearnedCaps = dataclasses.field(default_factory=LearnedCaps)
    reasoning: ReasoningCache | None = None  # what upstreams reasoned, for passback (presets)
    session: SessionChoice | None = None  # the client session's key bindings (affinity)
    last_answer: ForwardResult | None = None
    soonest_retry: float | None = None
    any_timeout: bool = False
    # Holds on keys taken by this request's attempts (keylimits.py); all but a served
    # stream's are released when the request's walk ends.
    leases: list[Lease] = dataclasses.field(default_factory=list)
    # Keys passed over for their rpm/concurrency limit, and skips for anything else.
    limited: list[str] = dataclasses.field(default_factory=list)
    other_skips: int = 0

    def skip(self, route: Route, why: str, ready_at: float | None, limited: list[str] = ()) -> None:
        """A channel passed over without sending anything."""
        self.attempts.append(Attempt(route.channel.name, "-", route.upstream_model, f"skipped: {why}"))
        self.soonest_retry = _earliest(self.soonest_retry, ready_at)
        self.limited.extend(limited)
        self.other_skips += not limited

    def start(self, route: Route, index: int, url: str = "") -> Attempt:
        channel = route.channel
        self.budget -= 1
        attempt = Attempt(
            channel.name, channel.key_label(index) if channel.api_keys else "-", route.upstream_model, "",
            url=url or channel.chat_url,
        )
        self.attempts.append(attempt)
        return attempt

    def breaker(self, attempt: Attempt) -> CircuitBreaker:
        return self.health.breaker(attempt.channel, attempt.url)

    def release_leases(self, keep: Lease | None) -> None:
        for lease in self.leases:
            if lease is not keep:
                lease.release()
        self.leases.clear()

    def fail(self, attempt: Attempt, error: "UpstreamError", prefix: str = "", response=None) -> None:
        """An attempt without a usable answer: no connection, or (`response`) a body that
        broke off."""
        # A client library's complaint may quote the URL, credentials included.
        attempt.outcome = scrub_text(prefix + error.reason, self.config.secrets)
        if response is None:
            note_answer(attempt, self.config.secrets)
        else:
            note_answer(attempt, self.config.secrets, response.status, response.reason or "", response.headers.items())
        self.any_timeout = self.any_timeout or error.timeout

    def result(self, route: Route, status: int, reason: str, headers, **fields) -> ForwardResult:
        fields.setdefault("upstream_url", route.channel.chat_url)
        return ForwardResult(
            status, reason, headers, route=route,
            attempts=self.attempts, candidates=len(self.plan.routes), **fields,
        )


class Forwarder:
    """The policy, in order: channels by priority (skipping open circuits), keys round
    robin within a channel; each attempt is sent, judged, and a failed one penalises its
    key (cooldown, disable) and counts for or against the channel's breaker."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.caps = LearnedCaps()
        self.reasoning = ReasoningCache()

    async def forward(
        self,
        config: GatewayConfig,
        health: HealthRegistry,
        plan: RoutePlan,
        request: ChatRequest,
        raw_body: bytes,
        client_headers: Iterable[tuple[str, str]],
        session: SessionChoice | None = None,
    ) -> ForwardResult:
        """`session`: the client session's key bindings (session affinity), or None."""
        run = AttemptRun(
            config, health, plan, request, raw_body, list(client_headers), config.max_attempts, caps=self.caps,
            reasoning=self.reasoning, session=session,
        )
        result = None
        try:
            for route in plan.routes:
                if (result := await self.try_channel(run, route)) is not None:
                    return result
                if run.budget <= 0:
                    break
            result = every_candidate_failed(run)
            return result
        finally:
            run.release_leases(keep=result.lease if result is not None and result.stream is not None else None)

    async def try_channel(self, run: AttemptRun, route: Route) -> ForwardResult | None:
        """The channel's keys in turn until one answers, the channel itself fails, or the
        budget is spent. None: move on to the next channel."""
        now = time.time()
        gates = url_gates(run.health, route.channel, now)
        if not gates:
            breakers = {url: run.health.breaker(route.channel.name, url) for url in route.channel.chat_urls}
            why = "; ".join(
                b.describe(now) if len(breakers) == 1 else f"{url}: {b.describe(now)}" for url, b in breakers.items()
            )
            run.skip(route, why, min(b.retry_at(now) for b in breakers.values()))
            return None
        tried: set[int] = set()
        try:
            while run.budget > 0:
                index = self.next_key(run, route, tried)
                if index is None:
                    break
                served, move_on = await self.attempt_urls(run, route, index, gates)
                if served is not None:
                    return served
                if move_on == NEXT_CHANNEL:
                    break
        except asyncio.CancelledError:
            for gate in gates:
                if gate.probe:
                    gate.breaker.release_probe()  # the client left; no verdict on the URL
            raise
        for gate in gates:
            if gate.probe and not gate.sent:
                gate.breaker.release_probe()
        return None

    async def attempt_urls(
        self, run: AttemptRun, route: Route, index: int, gates: list["UrlGate"]
    ) -> tuple[ForwardResult | None, str]:
        """One key on the channel's URLs in order: a URL that fails the way a channel
        fails (no connection, timeout, 5xx) hands the same key to the next URL."""
        move_on = NEXT_CHANNEL
        for gate in gates:
            if gate.failed or run.budget <= 0:
                continue
            gate.sent = True
            served, move_on = await self.attempt(run, route, index, gate.probe, url=gate.url)
            if served is not None or move_on != NEXT_CHANNEL:
                return served, move_on
            gate.failed = True
        return None, NEXT_CHANNEL

    @staticmethod
    def next_key(run: AttemptRun, route: Route, tried: set[int]) -> int | None:
        """The channel's next usable key, or None (recorded as a skip when the channel had
        no try of its own: after tries, the channel needs no excuse)."""
        pool = run.health.pools[route.channel.name]
        index, why_not = pool.pick(time.time(), tried, run.session)
        if index is None:
            if not tried:
                now = time.time()
                run.skip(route, why_not, pool.soonest_ready(now), pool.at_limit(now))
            return None
        tried.add(index)
        return index

    async def attempt(
        self, run: AttemptRun, route: Route, index: int, probe: bool, retry: bool = False, url: str = "",
    ) -> tuple[ForwardResult | None, str]:
        """One upstream request to `url` (default: the channel's first): (the answer to
        serve, "") or (None, NEXT_KEY|NEXT_CHANNEL). `retry`: this is the one retry on the
        same key after learning the upstream's cap."""
        channel = route.channel
        attempt = run.start(route, index, url)
        breaker = run.breaker(attempt)
        if channel.is_echo:
            breaker.record(True, time.time(), probe)
            return answer_echo(run, route, attempt), ""

        body, attempt.fixes = attempt_body(run, route)
        note_request(attempt, body)
        sent_at = time.monotonic()
        try:
            response = await self.send(run, channel, index, body, attempt.url)
        except UpstreamError as e:
            run.fail(attempt, e)
            breaker.record(False, time.time(), probe)
            return None, NEXT_CHANNEL  # a connection-level failure: the next channel, not the next key

        status = response.status
        headers = list(response.headers.items())
        fields = {"key_label": channel.key_label(index), "sent_body": body, "upstream_url": attempt.url}
        if status < 300 and is_event_stream(response.headers.get("content-type")):
            return await self.take_stream(run, route, index, attempt, probe, response, sent_at, fields)

        try:
            answer = await self.read(run, channel, response)
        except UpstreamError as e:
            run.fail(attempt, e, prefix=f"{status}, then ", response=response)
            breaker.record(False, time.time(), probe)
            return None, NEXT_CHANNEL

        verdict = self.judge(status, answer, channel, response.headers.get("content-type"))
        result = run.result(
            route, status, response.reason or "", response_headers_for_client(headers, False), body=answer, **fields,
        )
        if not retry and verdict.action == SERVE and self.learn_cap(run, route, status, answer, body):
            attempt.outcome = f"{status} output cap {self.caps.get(channel.name, route.upstream_model)} learnt, retrying"
            note_answer(attempt, run.config.secrets, status, result.reason, result.headers, answer)
            breaker.record(True, time.time(), probe)
            return await self.attempt(run, route, index, probe, retry=True, url=attempt.url)
        return self.settle(run, route, index, attempt, probe, verdict, result)

    async def take_stream(
        self, run: AttemptRun, route: Route, index: int, attempt: Attempt, probe: bool,
        response: aiohttp.ClientResponse, sent_at: float, fields: dict,
    ) -> tuple[ForwardResult | None, str]:
        """A 2xx event stream: read its first event and judge it before any byte goes to
        the client. An error there is a failed attempt like an error answer; otherwise
        the stream is served, starting with the bytes read."""
        channel = route.channel
        breaker = run.breaker(attempt)
        status = response.status
        try:
            first, data = await self.read_first_event(channel, response, sent_at)
        except asyncio.CancelledError:
            response.close()
            raise
        except UpstreamError as e:
            response.close()
            run.fail(attempt, e, prefix=f"{status} stream, then ", response=response)
            breaker.record(False, time.time(), probe)
            return None, NEXT_CHANNEL
        headers = response_headers_for_client(list(response.headers.items()), True)
        verdict = judge_first_event(data, channel.preset)
        if verdict is None:
            attempt.outcome, attempt.ok = str(status), True
            breaker.record(True, time.time(), probe)
            return run.result(
                route, status, response.reason or "", headers, stream=response, stream_first=first,
                lease=run.leases[-1] if run.leases else None, **fields,
            ), ""
        response.close()
        said = verdict.reason.removeprefix(f"{status} ").removeprefix("with an error body: ")
        verdict = dataclasses.replace(verdict, reason=f"{status} stream, first event: {said}")
        result = run.result(route, status, response.reason or "", headers, body=first, **fields)
        return self.settle(run, route, index, attempt, probe, verdict, result, dict(response.headers.items()))

    def settle(
        self, run: AttemptRun, route: Route, index: int, attempt: Attempt, probe: bool,
        verdict: Verdict, result: ForwardResult, upstream_headers: dict[str, str] | None = None,
    ) -> tuple[ForwardResult | None, str]:
        """Act on a verdict: serve, refuse, or penalise the key and move on."""
        channel = route.channel
        breaker = run.breaker(attempt)
        # The reason may quote the upstream's message, which may quote the key.
        attempt.outcome = scrub_text(verdict.reason or str(result.status), run.config.secrets)
        if verdict.action == SERVE:
            attempt.ok = result.status < 400
            breaker.record(True, time.time(), probe)
            return (_as_event_stream(result) if run.request.stream and result.ok else result), ""
        if verdict.action == REFUSE:
            breaker.record(True, time.time(), probe)
            return refused(run, result, attempt.outcome), ""
        run.last_answer = result
        note_answer(attempt, run.config.secrets, result.status, result.reason, result.headers, result.body or b"")
        if upstream_headers is None:
            upstream_headers = dict(result.headers)
        # The disable reason shows in /health: the scrubbed text, never the upstream's own.
        verdict = dataclasses.replace(verdict, reason=attempt.outcome)
        penalise(run.health.pools[channel.name], index, verdict, upstream_headers)
        # A key-level refusal still shows the channel itself is up.
        breaker.record(not verdict.channel_failure, time.time(), probe)
        return None, NEXT_CHANNEL if verdict.action == NEXT_CHANNEL else NEXT_KEY

    async def send(
        self, run: AttemptRun, channel: Channel, index: int, body: bytes, url: str = "",
    ) -> aiohttp.ClientResponse:
        """Open the upstream request with the channel's key; UpstreamError if no answer.
        The key's limits count the request from here (run.leases)."""
        headers = upstream_request_headers(run.client_headers, channel, channel.api_keys[index])
        run.leases.append(run.health.pools[channel.name].limits.acquire(index, time.time()))
        return await self.client.open(channel, headers, body, _deadline(run.request, channel), url=url)

    async def read(self, run: AttemptRun, channel: Channel, response: aiohttp.ClientResponse) -> bytes:
        """A buffered answer's whole body, within what is left of `timeouts.total`."""
        deadline = _deadline(run.request, channel)
        return await self.client.read_body(
            response, channel.timeouts.total if deadline is None else max(0.0, deadline - time.monotonic()),
            MAX_BUFFERED_BODY, channel.timeouts.total,
        )

    async def read_first_event(
        self, channel: Channel, response: aiohttp.ClientResponse, sent_at: float
    ) -> tuple[bytes, bytes | None]:
        """(the bytes read, the first event's data): read until the first event that is not
        a comment, within what is left of `timeouts.response_headers` (the wait for the
        stream to start). UpstreamError if none comes."""
        if response.headers.get("content-encoding", "identity").strip().lower() != "identity":
            return b"", None  # encoded events cannot be judged here; the hand-over deals with them
        limit = channel.timeouts.response_headers
        left = None if limit is None else max(0.0, limit - (time.monotonic() - sent_at))
        buffer = b""
        try:
            async with asyncio.timeout(left):
                while len(buffer) < MAX_FIRST_EVENT:
                    chunk = await response.content.readany()
                    if not chunk:
                        if not buffer.strip():
                            raise UpstreamError("stream ended before its first event")
                        return buffer, first_event_data(buffer + b"\n\n")[1]
                    buffer += chunk
                    complete, data = first_event_data(buffer)
                    if complete:
                        return buffer, data
        except TimeoutError:
            raise UpstreamError(f"no stream event within {limit:g}s (timeouts.response_headers)", timeout=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(f"connection broke before the first event: {type(e).__name__}") from None
        return buffer, None  # a first event this large is not an error report: serve it

    @staticmethod
    def judge(status: int, answer: bytes, channel: Channel, content_type: str | None) -> Verdict:
        return judge_answer(status, answer, channel.preset, content_type)

    def learn_cap(self, run: AttemptRun, route: Route, status: int, answer: bytes, sent: bytes) -> bool:
        """Whether the answer announced an output cap below what was sent (now remembered
        for this channel and upstream model). Only channels that rewrite bodies (a preset or
        `fixes`) learn: a channel without either sends the client's bytes, model aside."""
        if not (route.channel.preset or route.channel.fixes):
            return False
        cap = announced_cap(status, answer)
        if cap is None or run.budget <= 0:
            return False
        asked = requested_output(sent)
        if asked is None or asked <= cap:
            return False
        self.caps.learn(route.channel.name, route.upstream_model, cap)
        return True


# The most of an attempt's answer body an attempt flow keeps (attemptflows.py).
ATTEMPT_BODY_LIMIT = 256 * 1024


def note_request(attempt: Attempt, body: bytes) -> None:
    attempt.sent_body, attempt.started = body, time.time()


def note_answer(attempt: Attempt, secrets: tuple[str, ...], status: int | None = None, reason: str = "",
                headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
    """The upstream's answer to one attempt, for the flow view: scrubbed, bounded."""
    attempt.ended = time.time()
    attempt.status, attempt.reason = status, reason
    attempt.headers = [(k, scrub_text(v, secrets)) for k, v in headers]
    attempt.body = scrub_bytes(body[:ATTEMPT_BODY_LIMIT], secrets)


def _deadline(request: ChatRequest, channel: Channel) -> float | None:
    """A non-streaming exchange is bounded as a whole, headers and body: the monotonic time
    its `total` limit ends."""
    if request.stream or channel.timeouts.total is None:
        return None
    return time.monotonic() + channel.timeouts.total


# ---- the attempt body: the ONE place an attempt's request body is built ----------------
def attempt_body(run: AttemptRun, route: Route) -> tuple[bytes, tuple[str, ...]]:
    """What this attempt sends upstream and labels of the fixes it got, always built from
    the client's own bytes, so a failover never carries one channel's rewrites to the next."""
    body, fixes = build_attempt_body(run.raw_body, run.request, route, run.reasoning)
    # Learned output caps (caps.py) apply last, to whatever the body builder made.
    if (cap := run.caps.get(route.channel.name, route.upstream_model)) is not None:
        body, label = apply_cap(body, cap)
        fixes += (label,) if label else ()
    return body, fixes
# ---------------------------------------------------------------------------------------


def penalise(pool: KeyPool, index: int, verdict: Verdict, headers: dict[str, str]) -> None:
    """What a failed answer costs the key that got it. A cooldown lasts until the reset the
    upstream announced, else for its Retry-After, else the channel's `cooldown`."""
    now = time.time()
    if verdict.key_penalty == COOLDOWN:
        wait = parse_retry_after(headers, now)
        if verdict.cool_until is not None and verdict.cool_until > now:
            wait = min(verdict.cool_until - now, MAX_ANNOUNCED_COOLDOWN)
        pool.cool_down(index, pool.channel.cooldown if wait is None else wait, now)
    elif verdict.key_penalty == DISABLE:
        pool.disable(index, verdict.reason)


def refused(run: AttemptRun, result: ForwardResult, why: str) -> ForwardResult:
    """A request error inside a 200 (MiniMax's base_resp 2013): every channel would refuse
    the request too, so the client hears it as the 400 it is."""
    return gateway_error(
        400, f"The upstream {result.route.channel.name!r} refused the request: {why}. Change the "
        f"request (parameters, messages) and send it again.",
        "invalid_request_error", "upstream_rejected_request",
        route=result.route, key_label=result.key_label, upstream_url=result.upstream_url,
        sent_body=result.sent_body, attempts=run.attempts, candidates=len(run.plan.routes),
    )


def answer_echo(run: AttemptRun, route: Route, attempt: Attempt) -> ForwardResult:
    content_type, body = echo_reply(run.request, route.upstream_model)
    attempt.outcome, attempt.ok = "200 echo", True
    return ForwardResult(
        200, "OK", [("content-type", content_type)], body=body, route=route,
        key_label="-", upstream_url="echo:", sent_body=run.raw_body,
        attempts=run.attempts, candidates=len(run.plan.routes), origin="gateway",
    )


def every_candidate_failed(run: AttemptRun) -> ForwardResult:
    """The answer when no candidate served: 429 when every candidate's keys are at their
    limits, 503 when nothing was tried for other reasons, else the last upstream error
    answer, else 502/504 naming each channel and why."""
    attempts, candidates = run.attempts, len(run.plan.routes)
    summary = "; ".join(f"{a.channel} ({a.key}): {a.outcome}" for a in attempts)
    if run.limited and not run.other_skips and not any(not a.skipped for a in attempts):
        return gateway_error(
            429,
            f"Every key that serves model {run.plan.model!r} is at the limit the gateway's config "
            f"sets for it (api_keys rpm / max_concurrency, counted by this gateway process): "
            f"{', '.join(run.limited)}. Retry after the Retry-After seconds, or raise the limits. {summary}.",
            "requests", "rate_limit_exceeded",
            retry_after=None if run.soonest_retry is None else run.soonest_retry - time.time(),
            attempts=attempts, candidates=candidates,
        )
    if not any(not a.skipped for a in attempts):
        return gateway_error(
            503,
            f"Every channel for model {run.plan.model!r} has its keys cooling down or disabled "
            f"or its circuit open, so the gateway did not call any upstream. {summary}.",
            "service_unavailable", "channels_unavailable",
            retry_after=None if run.soonest_retry is None else run.soonest_retry - time.time(),
            attempts=attempts, candidates=candidates,
        )
    if (last := run.last_answer) is not None:
        last.attempts = attempts
        if last.status < 400:  # a 200 with an error inside, an HTML page, a redirect: never hand those on
            return gateway_error(
                502, f"No upstream gave a usable answer for model {run.plan.model!r}. Tried: {summary}.",
                "upstream_error", "upstream_error", attempts=attempts, candidates=candidates,
            )
        return last
    status, code = (504, "upstream_timeout") if run.any_timeout else (502, "upstream_unreachable")
    return gateway_error(
        status,
        f"No upstream answered for model {run.plan.model!r}. Tried: {summary}.",
        "upstream_error", code, attempts=attempts, candidates=candidates,
    )


@dataclasses.dataclass
class UrlGate:
    """One of a channel's URLs that its breaker lets a request through to."""

    url: str
    breaker: CircuitBreaker
    probe: bool  # let through by a half-open breaker: only this request's result may close it
    sent: bool = False
    failed: bool = False  # failed like a channel fails: the next URL gets the next try


def url_gates(health: HealthRegistry, channel: Channel, now: float) -> list[UrlGate]:
    """The channel's URLs whose breakers allow a request now, in order."""
    gates = []
    for url in channel.chat_urls:
        breaker = health.breaker(channel.name, url)
        if breaker.allow(now):
            gates.append(UrlGate(url, breaker, breaker.state == breaker.HALF_OPEN))
    return gates


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _as_event_stream(result: ForwardResult) -> ForwardResult:
    """The upstream ignored `stream: true` and answered JSON: convert it, because streaming
    clients cannot read a plain JSON body (OpenCode loops on one without an error)."""
    try:
        completion = json.loads(result.body or b"")
    except ValueError:
        completion = None
    if not isinstance(completion, dict) or "choices" not in completion:
        return result
    result.body = completion_to_events(completion)
    result.headers = [
        (k, v) for k, v in result.headers if k.lower() not in ("content-type", "content-length")
    ] + [("content-type", "text/event-stream; charset=utf-8")]
    result.origin = "gateway"
    return result
