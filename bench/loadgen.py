"""Load generator: keep-alive HTTP/1.1 clients on raw asyncio sockets, run as its own
process so it never shares an event loop (or a core's time slice) with what it measures.

Usage: python bench/loadgen.py '<json spec>'; prints one JSON line with the results.
Modes:
  rps    {"port", "conns", "duration", "warmup", "body": "small"|"opencode", "session"}
         -> requests/s, latency percentiles (ms); "session": "same" sends one x-session-id
         on every request, "new" a new one on each (session affinity's two paths)
  count  {"port", "conns", "count", "body"}  -> exactly `count` requests
  sse    {"port", "events", "repeat", "pause_ms", "body"}
         -> time to first complete event and total time per stream (ms)
  stream {"port", "events"} -> one long SSE stream, read as fast as it comes
"""

import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import payloads  # noqa: E402

now = time.perf_counter


class ResponseError(Exception):
    pass


class Client(asyncio.Protocol):
    """One keep-alive connection; `send()` returns when the whole response arrived."""

    def __init__(self):
        self.transport = None
        self.buf = bytearray()
        self.waiter = None
        self.sse = False

    def connection_made(self, transport):
        self.transport = transport

    def send(self, request: bytes, sse: bool = False):
        self.buf.clear()
        self.state = "head"
        self.status = 0
        self.sse = sse
        self.first_event_at = None
        self.events = 0
        self.body_bytes = 0
        self._last = b""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data):
        self.buf += data
        try:
            self._parse()
        except Exception as e:  # a malformed answer fails the request, not the process
            if self.waiter and not self.waiter.done():
                self.waiter.set_exception(ResponseError(repr(e)))

    def _body(self, data):
        self.body_bytes += len(data)
        if self.sse:
            n = data.count(b"\n\n") + (1 if self._last == b"\n" and data[:1] == b"\n" else 0)
            if n and self.first_event_at is None:
                self.first_event_at = now()
            self.events += n
            self._last = data[-1:]

    def _finish(self):
        if self.waiter and not self.waiter.done():
            self.waiter.set_result(self.status)

    def _parse(self):
        buf = self.buf
        if self.state == "head":
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[:end + 4]
            self.status = int(head[9:12])
            self.length = None
            if b"\r\ntransfer-encoding: chunked" in head:
                self.state = "chunk"
            else:
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.length = int(head[i + 17: j if j > 0 else None])
                    self.state = "length"
                else:
                    self.state = "eof"
        if self.state == "length":
            if len(buf) >= self.length:
                self._body(bytes(buf[:self.length]))
                del buf[:self.length]
                self.state = "done"
                self._finish()
        elif self.state == "chunk":
            pos = 0
            while True:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(bytes(buf[pos:nl]).split(b";")[0], 16)
                if size == 0:
                    if len(buf) < nl + 4:
                        break
                    pos = nl + 4
                    self.state = "done"
                    self._finish()
                    break
                if len(buf) < nl + 2 + size + 2:
                    break
                self._body(bytes(buf[nl + 2: nl + 2 + size]))
                pos = nl + 2 + size + 2
            del buf[:pos]
        elif self.state == "eof":
            self._body(bytes(buf))
            buf.clear()

    def connection_lost(self, exc):
        if self.waiter and not self.waiter.done():
            if self.state == "eof":
                self.state = "done"
                self._finish()
            else:
                self.waiter.set_exception(ResponseError(f"connection closed in state {self.state}"))


async def connect(port: int) -> Client:
    _, client = await asyncio.get_running_loop().create_connection(Client, "127.0.0.1", port)
    return client


def body_for(spec, stream=False) -> bytes:
    return payloads.opencode_body(stream) if spec.get("body") == "opencode" else payloads.small_body(stream)


def pct(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


class Requests:
    """The request to send, each time: the same bytes, or with a new session id."""

    def __init__(self, spec):
        session = spec.get("session", "")
        marker = "ses_bench00000000000000SESSION"
        self.fixed = payloads.request_bytes(spec["port"], body_for(spec), session=marker if session else "")
        self.count = 0
        if session == "new":
            self.before, self.after = self.fixed.split(marker.encode())

    def next(self) -> bytes:
        if not hasattr(self, "before"):
            return self.fixed
        self.count += 1
        return self.before + b"ses_bench%021d" % self.count + self.after


async def run_rps(spec):
    port, conns = spec["port"], spec["conns"]
    requests = Requests(spec)
    clients = [await connect(port) for _ in range(conns)]
    start = now()
    measure_from = start + spec.get("warmup", 0.5)
    stop_at = measure_from + spec["duration"]
    latencies = []
    errors = {}
    completed = 0
    total = 0

    async def worker(client):
        nonlocal completed, total
        while True:
            t0 = now()
            if t0 >= stop_at:
                return
            try:
                status = await client.send(requests.next())
            except ResponseError as e:
                errors[str(e)] = errors.get(str(e), 0) + 1
                return
            t1 = now()
            total += 1
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
            if t0 >= measure_from and t1 <= stop_at:
                latencies.append(t1 - t0)
            if measure_from <= t1 <= stop_at:
                completed += 1

    await asyncio.gather(*(worker(c) for c in clients))
    for c in clients:
        c.transport.close()
    latencies.sort()
    return {
        "rps": completed / spec["duration"],
        "p50_ms": pct(latencies, 50) * 1000 if latencies else None,
        "p99_ms": pct(latencies, 99) * 1000 if latencies else None,
        "n": len(latencies),
        "total": total,
        "errors": errors,
    }


async def run_count(spec):
    port, conns, count = spec["port"], spec["conns"], spec["count"]
    request = payloads.request_bytes(port, body_for(spec))
    clients = [await connect(port) for _ in range(conns)]
    left = count
    errors = {}
    t0 = now()

    async def worker(client):
        nonlocal left
        while left > 0:
            left -= 1
            try:
                status = await client.send(request)
            except ResponseError as e:
                errors[str(e)] = errors.get(str(e), 0) + 1
                return
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1

    await asyncio.gather(*(worker(c) for c in clients))
    for c in clients:
        c.transport.close()
    return {"count": count, "seconds": now() - t0, "errors": errors}


async def run_sse(spec):
    port = spec["port"]
    events = spec["events"]
    request = payloads.request_bytes(port, body_for(spec, stream=True), events=events,
                                     pause_ms=spec.get("pause_ms", 0))
    client = await connect(port)
    firsts, totals, errors = [], [], {}
    for _ in range(spec["repeat"]):
        t0 = now()
        try:
            status = await client.send(request, sse=True)
        except ResponseError as e:
            errors[str(e)] = errors.get(str(e), 0) + 1
            client.transport.close()
            client = await connect(port)
            continue
        t1 = now()
        if status != 200 or client.events != events + 2:
            key = f"status {status}, {client.events} events"
            errors[key] = errors.get(key, 0) + 1
            continue
        firsts.append(client.first_event_at - t0)
        totals.append(t1 - t0)
    client.transport.close()
    firsts.sort()
    totals.sort()
    return {
        "first_ms": pct(firsts, 50) * 1000 if firsts else None,
        "total_ms": pct(totals, 50) * 1000 if totals else None,
        "first_max_ms": firsts[-1] * 1000 if firsts else None,
        "n": len(firsts),
        "errors": errors,
    }


async def run_stream(spec):
    port = spec["port"]
    request = payloads.request_bytes(port, body_for(spec, stream=True), events=spec["events"])
    client = await connect(port)
    t0 = now()
    status = await client.send(request, sse=True)
    seconds = now() - t0
    client.transport.close()
    ok = status == 200 and client.events == spec["events"] + 2
    return {"seconds": seconds, "events": client.events, "bytes": client.body_bytes,
            "errors": {} if ok else {f"status {status}, {client.events} events": 1}}


MODES = {"rps": run_rps, "count": run_count, "sse": run_sse, "stream": run_stream}

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    result = asyncio.run(asyncio.wait_for(MODES[spec["mode"]](spec), spec.get("timeout", 300)))
    print(json.dumps(result), flush=True)
