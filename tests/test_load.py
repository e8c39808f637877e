"""A bounded load test on loopback: a few hundred concurrent streaming requests over healthy and
failing upstreams. Every request must end in a complete stream or a clear error; none may be
lost or hang. Figures print with `pytest -s`."""

import asyncio
import collections
import itertools
import json
import time

import httpx

from chatclient import AUTH, CHAT, chat_flows, events
from conftest import channel, config
from fakeupstream import chunk, chunk_events, http_head, json_answer, sse_answer
from harness import free_port

REQUESTS = 240
PER_REQUEST_TIMEOUT = 30.0
OVERALL_TIMEOUT = 90.0
SSE_HEAD = http_head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})


class Faults:
    """Counts what the fake upstreams did wrong on purpose."""

    def __init__(self) -> None:
        self.counts = collections.Counter()

    def __call__(self, kind: str, steps: list) -> list:
        self.counts[kind] += 1
        return steps

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def stream_of(model: str, pieces: int = 6, delay: float = 0.01) -> list:
    return sse_answer(chunk_events(model, [f"w{i} " for i in range(pieces)]), delay=delay)


def flaky(faults: Faults):
    """Before headers: 503, reset, or no headers at all; otherwise a good stream."""
    turn = itertools.count()

    def behaviour(r):
        n = next(turn)
        if n % 4 == 0:
            return faults("flaky: 503", json_answer(503, {"error": {"message": "overloaded"}}))
        if n % 4 == 1:
            return faults("flaky: reset before headers", [("reset",)])
        if n % 8 == 2:
            return faults("flaky: headers never sent", [("hang",)])
        return stream_of(r.json["model"])

    return behaviour


def cutting(faults: Faults):
    """After the first bytes: a reset, or silence; otherwise a good stream."""
    turn = itertools.count()
    events_ = chunk_events("cut", ["a", "b", "c"])

    def behaviour(r):
        n = next(turn)
        partial = [("send", SSE_HEAD), ("send", chunk(events_[0])), ("send", chunk(events_[1]))]
        if n % 3 == 0:
            return faults("cut: reset mid-stream", partial + [("sleep", 0.02), ("reset",)])
        if n % 3 == 1:
            return faults("cut: idle mid-stream", partial + [("hang",)])
        return stream_of("cut")

    return behaviour


async def one_request(client: httpx.AsyncClient, model: str) -> tuple[str, str]:
    """(outcome, detail): "complete", "error" (clear: an error status with an OpenAI error
    body, or a final error event), or "lost" (anything else: truncation, exception, hang)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with asyncio.timeout(PER_REQUEST_TIMEOUT):
            async with client.stream("POST", CHAT, json=body, headers=AUTH) as response:
                text = (await response.aread()).decode()
    except TimeoutError:
        return "lost", "hung"
    except httpx.HTTPError as e:
        return "lost", f"{type(e).__name__}: {e}"
    if response.status_code != 200:
        try:
            error = json.loads(text)["error"]
            return "error", f"{response.status_code} {error['code']}"
        except (ValueError, KeyError, TypeError):
            return "lost", f"{response.status_code} without an error body"
    payloads = events(text)
    if payloads and payloads[-1] == "[DONE]":
        return "complete", response.headers.get("x-ccx-channel", "?")
    if payloads and isinstance(payloads[-1], dict) and "error" in payloads[-1]:
        return "error", payloads[-1]["error"]["code"]
    return "lost", f"truncated: {text[-80:]!r}"


async def run_load(url: str, models: list[str]) -> list[tuple[str, str, str]]:
    limits = httpx.Limits(max_connections=len(models) + 10, max_keepalive_connections=len(models) + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=PER_REQUEST_TIMEOUT) as client:
        async with asyncio.timeout(OVERALL_TIMEOUT):
            results = await asyncio.gather(*(one_request(client, m) for m in models))
    return [(m, *r) for m, r in zip(models, results)]


def test_concurrent_streams_over_healthy_and_failing_upstreams(gateway, upstreams):
    faults = Faults()
    flaky_up = upstreams(flaky(faults))
    healthy_up = upstreams(lambda r: stream_of(r.json["model"]))
    cut_up = upstreams(cutting(faults))
    dead_port = free_port()
    gw = gateway(config(
        channel("flaky", flaky_up.url + "/v1", extra='supported_models: ["ok"]\ntimeouts: {response_headers: 0.5}'),
        channel("dead", f"http://127.0.0.1:{dead_port}/v1", extra='supported_models: ["ok"]'),
        channel("healthy", healthy_up.url + "/v1", extra='supported_models: ["ok"]'),
        channel("cut", cut_up.url + "/v1", extra='supported_models: ["cut"]\ntimeouts: {idle: 0.5}'),
        # A short back-off keeps the breakers cycling (open, probe, close) during the run.
        top="circuit_breaker: {backoff: 0.2, max_backoff: 1}\n",
    ))
    models = ["cut" if i % 3 == 2 else "ok" for i in range(REQUESTS)]

    started = time.monotonic()
    results = asyncio.run(run_load(gw.url, models))
    seconds = time.monotonic() - started

    outcomes = collections.Counter((m, outcome) for m, outcome, _ in results)
    details = collections.Counter(f"{m} {outcome}: {detail}" for m, outcome, detail in results)
    lost = [r for r in results if r[1] == "lost"]
    refused = sum(1 for f in chat_flows(gw, REQUESTS, timeout=15)
                  for a in f.metadata["ccx"]["attempts"] if a["channel"] == "dead" and "cannot connect" in a["outcome"])
    print(f"\nload: {REQUESTS} concurrent streaming requests in {seconds:.1f}s; "
          f"failures injected: {faults.total + refused} "
          f"({', '.join(f'{k} {v}' for k, v in sorted(faults.counts.items()))}, dead: refused {refused}); "
          f"complete {sum(1 for r in results if r[1] == 'complete')}, "
          f"clear errors {sum(1 for r in results if r[1] == 'error')}, lost {len(lost)}")
    for line, count in sorted(details.items()):
        print(f"  {count:4d}  {line}")

    assert len(results) == REQUESTS
    assert lost == []
    # Failover covers every fault before the first byte: each "ok" request completes.
    assert outcomes[("ok", "complete")] == models.count("ok")
    # A "cut" request ends complete or with the error event (or, while its only channel's
    # circuit is open, a 503 channels_unavailable): never silently.
    assert outcomes[("cut", "complete")] + outcomes[("cut", "error")] == models.count("cut")
    assert outcomes[("cut", "error")] > 0 and faults.counts["flaky: 503"] > 0
    assert flaky_up.received and cut_up.received
    # One flow per request, each telling what happened.
    flows = chat_flows(gw, REQUESTS, timeout=15)
    assert len(flows) == REQUESTS
    assert all(f.metadata["ccx"]["status"] in (200, 503) for f in flows)
