"""The attempt loop: try the planned channels (and their keys) in order until one answers
in a way worth giving the client. Knows nothing of mitmproxy flows."""

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterable

import aiohttp

from .body import ChatRequest, replace_model, with_stream_usage
from .config import Channel, GatewayConfig
from .echo import echo_reply
from .errors import error_body
from .health import HealthRegistry, KeyPool
from .redact import scrub_text
from .routing import Route, RoutePlan
from .sse import completion_to_events, is_event_stream
from .upstream import (
    UpstreamClient, UpstreamError, Verdict, judge_status, parse_retry_after,
    response_headers_for_client, upstream_request_headers,
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


# Failed attempts move on to the next key of the same channel or to the next channel.
NEXT_KEY, NEXT_CHANNEL = "next_key", "next_channel"


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
    last_answer: ForwardResult | None = None
    soonest_retry: float | None = None
    any_timeout: bool = False

    def skip(self, route: Route, why: str, ready_at: float | None) -> None:
        """A channel passed over without sending anything."""
        self.attempts.append(Attempt(route.channel.name, "-", route.upstream_model, f"skipped: {why}"))
        self.soonest_retry = _earliest(self.soonest_retry, ready_at)

    def start(self, route: Route, index: int) -> Attempt:
        channel = route.channel
        self.budget -= 1
        attempt = Attempt(channel.name, channel.key_label(index) if channel.api_keys else "-", route.upstream_model, "")
        self.attempts.append(attempt)
        return attempt

    def fail(self, attempt: Attempt, error: "UpstreamError", prefix: str = "") -> None:
        attempt.outcome = prefix + error.reason
        self.any_timeout = self.any_timeout or error.timeout

    def result(self, route: Route, status: int, reason: str, headers, **fields) -> ForwardResult:
        return ForwardResult(
            status, reason, headers, route=route, upstream_url=route.channel.chat_url,
            attempts=self.attempts, candidates=len(self.plan.routes), **fields,
        )


class Forwarder:
    """The policy, in order: channels by priority (skipping open circuits), keys round
    robin within a channel; each attempt is sent, judged, and a failed one penalises its
    key (cooldown, disable) and counts for or against the channel's breaker."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    async def forward(
        self,
        config: GatewayConfig,
        health: HealthRegistry,
        plan: RoutePlan,
        request: ChatRequest,
        raw_body: bytes,
        client_headers: Iterable[tuple[str, str]],
    ) -> ForwardResult:
        run = AttemptRun(config, health, plan, request, raw_body, list(client_headers), config.max_attempts)
        for route in plan.routes:
            if (served := await self.try_channel(run, route)) is not None:
                return served
            if run.budget <= 0:
                break
        return every_candidate_failed(run)

    async def try_channel(self, run: AttemptRun, route: Route) -> ForwardResult | None:
        """The channel's keys in turn until one answers, the channel itself fails, or the
        budget is spent. None: move on to the next channel."""
        breaker = run.health.breakers[route.channel.name]
        now = time.time()
        if not breaker.allow(now):
            run.skip(route, breaker.describe(now), breaker.retry_at(now))
            return None
        # Only a half-open breaker's probe may close or re-open it.
        probe = breaker.state == breaker.HALF_OPEN
        tried: set[int] = set()
        try:
            while run.budget > 0:
                index = self.next_key(run, route, tried)
                if index is None:
                    break
                served, move_on = await self.attempt(run, route, index, probe)
                if served is not None:
                    return served
                if move_on == NEXT_CHANNEL:
                    break
        except asyncio.CancelledError:
            breaker.release_probe()  # the client left; no verdict on the channel
            raise
        if not tried:
            breaker.release_probe()
        return None

    @staticmethod
    def next_key(run: AttemptRun, route: Route, tried: set[int]) -> int | None:
        """The channel's next usable key, or None (recorded as a skip when the channel had
        no try of its own: after tries, the channel needs no excuse)."""
        pool = run.health.pools[route.channel.name]
        index, why_not = pool.pick(time.time(), tried)
        if index is None:
            if not tried:
                run.skip(route, why_not, pool.soonest_ready(time.time()))
            return None
        tried.add(index)
        return index

    async def attempt(
        self, run: AttemptRun, route: Route, index: int, probe: bool
    ) -> tuple[ForwardResult | None, str]:
        """One upstream request: (the answer to serve, "") or (None, NEXT_KEY|NEXT_CHANNEL)."""
        channel = route.channel
        breaker = run.health.breakers[channel.name]
        attempt = run.start(route, index)
        if channel.is_echo:
            breaker.record(True, time.time(), probe)
            return answer_echo(run, route, attempt), ""

        body = attempt_body(run, route)
        try:
            response = await self.send(run, channel, index, body)
        except UpstreamError as e:
            run.fail(attempt, e)
            breaker.record(False, time.time(), probe)
            return None, NEXT_CHANNEL  # a connection-level failure: the next channel, not the next key

        status = response.status
        upstream_headers = list(response.headers.items())
        label = channel.key_label(index)
        if status < 300 and is_event_stream(response.headers.get("content-type")):
            attempt.outcome, attempt.ok = str(status), True
            breaker.record(True, time.time(), probe)
            return run.result(
                route, status, response.reason or "", response_headers_for_client(upstream_headers, True),
                stream=response, key_label=label, sent_body=body,
            ), ""

        try:
            answer = await self.read(run, channel, response)
        except UpstreamError as e:
            run.fail(attempt, e, prefix=f"{status}, then ")
            breaker.record(False, time.time(), probe)
            return None, NEXT_CHANNEL

        verdict = self.judge(status, answer)
        # The reason may quote the upstream's message, which may quote the key.
        attempt.outcome = scrub_text(verdict.reason or str(status), run.config.secrets)
        result = run.result(
            route, status, response.reason or "", response_headers_for_client(upstream_headers, False),
            body=answer, key_label=label, sent_body=body,
        )
        if verdict.action == "serve":
            attempt.ok = status < 400
            breaker.record(True, time.time(), probe)
            return (_as_event_stream(result) if run.request.stream and status < 300 else result), ""

        run.last_answer = result
        penalise(run.health.pools[channel.name], index, verdict, dict(upstream_headers))
        # A key-level refusal still shows the channel itself is up.
        breaker.record(not verdict.channel_failure, time.time(), probe)
        return None, NEXT_CHANNEL if verdict.action == NEXT_CHANNEL else NEXT_KEY

    async def send(self, run: AttemptRun, channel: Channel, index: int, body: bytes) -> aiohttp.ClientResponse:
        """Open the upstream request with the channel's key; UpstreamError if no answer."""
        headers = upstream_request_headers(run.client_headers, channel, channel.api_keys[index])
        return await self.client.open(channel, headers, body, _deadline(run.request, channel))

    async def read(self, run: AttemptRun, channel: Channel, response: aiohttp.ClientResponse) -> bytes:
        """A buffered answer's whole body, within what is left of `timeouts.total`."""
        deadline = _deadline(run.request, channel)
        return await self.client.read_body(
            response, channel.timeouts.total if deadline is None else max(0.0, deadline - time.monotonic()),
            MAX_BUFFERED_BODY, channel.timeouts.total,
        )

    @staticmethod
    def judge(status: int, answer: bytes) -> Verdict:
        return judge_status(status, answer)


def _deadline(request: ChatRequest, channel: Channel) -> float | None:
    """A non-streaming exchange is bounded as a whole, headers and body: the monotonic time
    its `total` limit ends."""
    if request.stream or channel.timeouts.total is None:
        return None
    return time.monotonic() + channel.timeouts.total


# ---- the attempt body: the ONE place an attempt's request body is built ----------------
def attempt_body(run: AttemptRun, route: Route) -> bytes:
    """What this attempt sends upstream, always built from the client's own bytes, so a
    failover never carries one channel's rewrites to the next."""
    body = replace_model(run.raw_body, run.request, route.upstream_model)
    if route.channel.stream_usage:
        body = with_stream_usage(body, run.request)
    return body
# ---------------------------------------------------------------------------------------


def penalise(pool: KeyPool, index: int, verdict: Verdict, headers: dict[str, str]) -> None:
    """What a failed answer costs the key that got it."""
    if verdict.key_penalty == "cooldown":
        wait = parse_retry_after(headers, time.time())
        pool.cool_down(index, pool.channel.cooldown if wait is None else wait, time.time())
    elif verdict.key_penalty == "disable":
        pool.disable(index, verdict.reason)


def answer_echo(run: AttemptRun, route: Route, attempt: Attempt) -> ForwardResult:
    content_type, body = echo_reply(run.request, route.upstream_model)
    attempt.outcome, attempt.ok = "200 echo", True
    return ForwardResult(
        200, "OK", [("content-type", content_type)], body=body, route=route,
        key_label="-", upstream_url="echo:", sent_body=run.raw_body,
        attempts=run.attempts, candidates=len(run.plan.routes), origin="gateway",
    )


def every_candidate_failed(run: AttemptRun) -> ForwardResult:
    """The answer when no candidate served: 503 when nothing was even tried, else the last
    upstream error answer, else 502/504 naming each channel and why."""
    attempts, candidates = run.attempts, len(run.plan.routes)
    summary = "; ".join(f"{a.channel} ({a.key}): {a.outcome}" for a in attempts)
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
        if last.ok:  # a 200 with an error inside: never hand that on as a success
            return gateway_error(
                502, f"The upstream answered 200 with an error. Tried: {summary}.",
                "upstream_error", "upstream_error", attempts=attempts, candidates=candidates,
            )
        return last
    status, code = (504, "upstream_timeout") if run.any_timeout else (502, "upstream_unreachable")
    return gateway_error(
        status,
        f"No upstream answered for model {run.plan.model!r}. Tried: {summary}.",
        "upstream_error", code, attempts=attempts, candidates=candidates,
    )


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
