"""The attempt loop: try the planned channels (and their keys) in order until one answers
in a way worth giving the client. Knows nothing of mitmproxy flows."""

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterable

import aiohttp

from .body import ChatRequest, replace_model, with_stream_usage
from .config import GatewayConfig
from .echo import echo_reply
from .errors import error_body
from .health import HealthRegistry
from .redact import scrub_bytes, scrub_text
from .routing import Route, RoutePlan
from .sse import completion_to_events, is_event_stream
from .upstream import (
    UpstreamClient, UpstreamError, judge_status, parse_retry_after,
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
    # What the flow view shows of an attempt as a flow of its own (attemptflows.py): set
    # by note_request / note_answer, never a key (headers masked, bodies scrubbed, bounded).
    url: str = ""
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


# How much of a failed attempt's answer its flow keeps.
ATTEMPT_BODY_LIMIT = 256 * 1024


def note_request(attempt: Attempt, url: str, body: bytes) -> None:
    attempt.url, attempt.sent_body, attempt.started = url, body, time.time()


def note_answer(attempt: Attempt, secrets: tuple[str, ...], status: int | None = None, reason: str = "",
                headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
    """The upstream's answer to one attempt, for the flow view: scrubbed, bounded."""
    attempt.ended = time.time()
    attempt.status, attempt.reason = status, reason
    attempt.headers = [(k, scrub_text(v, secrets)) for k, v in headers]
    attempt.body = scrub_bytes(body[:ATTEMPT_BODY_LIMIT], secrets)


def gateway_error(status: int, message: str, type_: str, code: str, **extra) -> ForwardResult:
    headers = [("content-type", "application/json")]
    if (retry_after := extra.pop("retry_after", None)) is not None:
        headers.append(("retry-after", str(max(1, int(retry_after + 0.999)))))
    return ForwardResult(
        status=status, reason="", headers=headers, body=error_body(message, type_, code),
        origin="gateway", **extra,
    )


class Forwarder:
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
        client_headers = list(client_headers)
        attempts: list[Attempt] = []
        last_answer: ForwardResult | None = None
        soonest_retry: float | None = None
        any_timeout = False
        budget = config.max_attempts

        for route in plan.routes:
            channel = route.channel
            now = time.time()
            breaker = health.breakers[channel.name]
            if not breaker.allow(now):
                attempts.append(Attempt(channel.name, "-", route.upstream_model, f"skipped: {breaker.describe(now)}"))
                soonest_retry = _earliest(soonest_retry, breaker.retry_at(now))
                continue
            # Only a half-open breaker's probe may close or re-open it.
            probe = breaker.state == breaker.HALF_OPEN
            pool = health.pools[channel.name]
            tried: set[int] = set()
            probe_used = False
            while budget > 0:
                index, why_not = pool.pick(time.time(), tried)
                if index is None:
                    if not tried:  # after tries of its own, the channel needs no excuse
                        attempts.append(Attempt(channel.name, "-", route.upstream_model, f"skipped: {why_not}"))
                        soonest_retry = _earliest(soonest_retry, pool.soonest_ready(time.time()))
                    break
                tried.add(index)
                budget -= 1
                probe_used = True
                label = channel.key_label(index)
                attempt = Attempt(channel.name, label if channel.api_keys else "-", route.upstream_model, "")
                attempts.append(attempt)

                if channel.is_echo:
                    content_type, body = echo_reply(request, route.upstream_model)
                    attempt.outcome, attempt.ok = "200 echo", True
                    breaker.record(True, time.time(), probe)
                    return ForwardResult(
                        200, "OK", [("content-type", content_type)], body=body, route=route,
                        key_label="-", upstream_url="echo:", sent_body=raw_body,
                        attempts=attempts, candidates=len(plan.routes), origin="gateway",
                    )

                body = replace_model(raw_body, request, route.upstream_model)
                if channel.stream_usage:
                    body = with_stream_usage(body, request)
                headers = upstream_request_headers(client_headers, channel, channel.api_keys[index])
                note_request(attempt, channel.chat_url, body)
                # A non-streaming exchange is bounded as a whole, headers and body.
                deadline = None if request.stream or channel.timeouts.total is None else (
                    time.monotonic() + channel.timeouts.total)
                try:
                    response = await self.client.open(channel, headers, body, deadline)
                except asyncio.CancelledError:
                    breaker.release_probe()  # the client left; no verdict on the channel
                    raise
                except UpstreamError as e:
                    attempt.outcome = e.reason
                    note_answer(attempt, config.secrets)
                    any_timeout = any_timeout or e.timeout
                    breaker.record(False, time.time(), probe)
                    break  # a connection-level failure: the next channel, not the next key

                status = response.status
                upstream_headers = list(response.headers.items())
                streaming = status < 300 and is_event_stream(response.headers.get("content-type"))
                if streaming:
                    attempt.outcome, attempt.ok = str(status), True
                    breaker.record(True, time.time(), probe)
                    return ForwardResult(
                        status, response.reason or "", response_headers_for_client(upstream_headers, True),
                        stream=response, route=route, key_label=label, upstream_url=channel.chat_url,
                        sent_body=body, attempts=attempts, candidates=len(plan.routes),
                    )

                try:
                    answer = await self.client.read_body(
                        response, channel.timeouts.total if deadline is None
                        else max(0.0, deadline - time.monotonic()),
                        MAX_BUFFERED_BODY, channel.timeouts.total,
                    )
                except asyncio.CancelledError:
                    breaker.release_probe()
                    raise
                except UpstreamError as e:
                    attempt.outcome = f"{status}, then {e.reason}"
                    note_answer(attempt, config.secrets, status, response.reason or "", upstream_headers)
                    any_timeout = any_timeout or e.timeout
                    breaker.record(False, time.time(), probe)
                    break

                verdict = judge_status(status, answer)
                # The reason may quote the upstream's message, which may quote the key.
                attempt.outcome = scrub_text(verdict.reason or str(status), config.secrets)
                result = ForwardResult(
                    status, response.reason or "", response_headers_for_client(upstream_headers, False),
                    body=answer, route=route, key_label=label, upstream_url=channel.chat_url,
                    sent_body=body, attempts=attempts, candidates=len(plan.routes),
                )
                if verdict.action == "serve":
                    attempt.ok = status < 400
                    breaker.record(True, time.time(), probe)
                    if request.stream and status < 300:
                        return _as_event_stream(result)
                    return result

                last_answer = result
                note_answer(attempt, config.secrets, status, response.reason or "", upstream_headers, answer)
                if verdict.key_penalty == "cooldown":
                    wait = parse_retry_after(dict(upstream_headers), time.time())
                    pool.cool_down(index, channel.cooldown if wait is None else wait, time.time())
                elif verdict.key_penalty == "disable":
                    pool.disable(index, verdict.reason)
                # A key-level refusal still shows the channel itself is up.
                breaker.record(not verdict.channel_failure, time.time(), probe)
                if verdict.action == "next_channel":
                    break
            if not probe_used:
                breaker.release_probe()
            if budget <= 0:
                break

        candidates = len(plan.routes)
        tried = [a for a in attempts if not a.skipped]
        summary = "; ".join(f"{a.channel} ({a.key}): {a.outcome}" for a in attempts)
        if not tried:
            return gateway_error(
                503,
                f"Every channel for model {plan.model!r} has its keys cooling down or disabled "
                f"or its circuit open, so the gateway did not call any upstream. {summary}.",
                "service_unavailable", "channels_unavailable",
                retry_after=None if soonest_retry is None else soonest_retry - time.time(),
                attempts=attempts, candidates=candidates,
            )
        if last_answer is not None:
            last_answer.attempts = attempts
            if last_answer.ok:  # a 200 with an error inside: never hand that on as a success
                return gateway_error(
                    502, f"The upstream answered 200 with an error. Tried: {summary}.",
                    "upstream_error", "upstream_error", attempts=attempts, candidates=candidates,
                )
            return last_answer
        status, code = (504, "upstream_timeout") if any_timeout else (502, "upstream_unreachable")
        return gateway_error(
            status,
            f"No upstream answered for model {plan.model!r}. Tried: {summary}.",
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
