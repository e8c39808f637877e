"""What a hostile client costs the gateway, in figures (issue 9), on 127.0.0.1 only.

    python bench/hardening.py [--source DIR] [--unauth-mb 300] [--bomb-mb 1] [--headers 20000]

For a fresh `mitmdump -s ccx_addon/addon.py` each (fake upstream, placeholder target):
- `/health` latency (median and worst of probes every 50 ms) while requests with 20,000
  short headers are sent, and how long each of those takes to be answered;
- peak RSS (VmHWM) after a gzip bomb (`--bomb-mb` of gzip, zeros inside) with the key;
- peak RSS after an unauthenticated `--unauth-mb` POST, with Content-Length and chunked.
`--source DIR` runs another checkout's addon (e.g. the code before a change) for comparison.
Asserts nothing; prints a table.
"""

import argparse
import gzip
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rawfuzz  # noqa: E402
from fakeupstream import FakeUpstream  # noqa: E402
from gateway_process import start_gateway  # noqa: E402
from rawfuzz import chunked, exchange, head, with_length  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Gateway:
    def __init__(self, tmp: Path, source: Path | None) -> None:
        self.upstream = FakeUpstream().start()
        config = tmp / f"ccx-{time.monotonic_ns()}.yaml"
        config.write_text(rawfuzz.gateway_config(self.upstream.url))
        script = source / "ccx_addon" / "addon.py" if source else None
        # addon.py imports the installed package first: put the other checkout before it.
        env = {"PYTHONPATH": str(source)} if source else None
        self.gw = start_gateway(config, tmp, script=script, env=env)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.gw.stop()
        self.upstream.stop()


def health_latency_idle(gw, probes: int = 20) -> float:
    """Median /health latency with nothing else going on, in ms: the baseline."""
    latencies = []
    with httpx.Client(timeout=30) as client:
        for _ in range(probes):
            start = time.perf_counter()
            client.get(gw.url + "/health")
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    return 1000 * statistics.median(latencies)


def health_during_many_headers(gw, count: int, rounds: int = 5) -> dict:
    request = with_length(head(headers=[b"x-h%d: %d" % (i, i) for i in range(count)], auth=False), b"{}")
    latencies, answered, statuses = [], [], []
    done = threading.Event()

    def probe():
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get(gw.url + "/health")
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            answer = exchange(gw.port, request, timeout=300)
            answered.append(time.perf_counter() - start)
            statuses.append(answer[0] if answer else "closed")
    finally:
        done.set()
        prober.join()
    return {"health_p50_ms": 1000 * statistics.median(latencies), "health_max_ms": 1000 * max(latencies),
            "request_s": statistics.median(answered), "status": statuses[0]}


def rss_for(gw, data: bytes, timeout: float = 600) -> tuple[float, float, object]:
    before = peak_rss_mb(gw.process.pid)
    answer = exchange(gw.port, data, timeout=timeout)
    time.sleep(0.3)
    return before, peak_rss_mb(gw.process.pid), answer[0] if answer else "closed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=None)
    parser.add_argument("--unauth-mb", type=int, default=300)
    parser.add_argument("--bomb-mb", type=float, default=1.0)
    parser.add_argument("--headers", type=int, default=20_000)
    args = parser.parse_args()
    label = f"source {args.source}" if args.source else "this checkout"
    print(f"ccx-addon hardening figures ({label}; Python {sys.version.split()[0]})")
    with tempfile.TemporaryDirectory() as tmp:
        with Gateway(Path(tmp), args.source) as g:
            idle = health_latency_idle(g.gw)
            figures = health_during_many_headers(g.gw, args.headers)
            print(f"{args.headers} headers, no key: answered {figures['status']} in {figures['request_s']:.2f}s (median of 5); "
                  f"/health meanwhile p50 {figures['health_p50_ms']:.1f} ms, worst {figures['health_max_ms']:.1f} ms "
                  f"(idle: {idle:.1f} ms)")
        inflated = int(args.bomb_mb * 1024 * 1024 * 1030)  # zeros compress ~1030:1
        bomb = gzip.compress(b'{"model": "m", "messages": [], "x": "' + b"0" * inflated + b'"}', 9)
        with Gateway(Path(tmp), args.source) as g:
            before, after, status = rss_for(g.gw, with_length(head(headers=[b"content-encoding: gzip"]), bomb))
            print(f"gzip bomb {len(bomb) / 2**20:.2f} MB ({inflated / 2**20:.0f} MB inflated), with key: "
                  f"{status}; peak RSS {before:.0f} -> {after:.0f} MB")
        body = b"x" * (args.unauth_mb * 1024 * 1024)
        for name, make in (("content-length", with_length), ("chunked", chunked)):
            with Gateway(Path(tmp), args.source) as g:
                before, after, status = rss_for(g.gw, make(head(auth=False), body))
                print(f"{args.unauth_mb} MB unauthenticated POST ({name}): {status}; peak RSS {before:.0f} -> {after:.0f} MB")


if __name__ == "__main__":
    main()
