"""The gateway against bare mitmdump, in one run on one machine, on 127.0.0.1 only.

    python bench/run.py [--quick] [--mitmdump PATH] [--variant NAME=SCRIPT ...] [--rewrite] [--json OUT]

Starts a fast fake upstream (bench/upstream.py), bare mitmdump in reverse mode (once as is,
once with a one-line addon that streams responses, for SSE), and the gateway
(`mitmdump -s ccx_addon/addon.py`, two channels, the first healthy with a pool of three keys,
with a model mapping), and the same gateway with the deepseek preset on those channels
(column `preset`).
Every figure comes from a separate load-generator process (bench/loadgen.py) and is the
median over interleaved repetitions. Prints a table with gateway/bare ratios. Asserts
nothing about speed; exits non-zero only when a request fails.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

CONFIG = """\
proxy_access_keys: ["bench-access-key"]
channels:
  - name: primary
    base_url: http://127.0.0.1:{up}/v1
    api_keys: ["sk-bench-primary-key", "sk-bench-primary-key-2", "sk-bench-primary-key-3"]
    model_mapping: {{"gpt-5": "bench-up"}}
  - name: backup
    base_url: http://127.0.0.1:{up}/v1
    api_keys: ["sk-bench-backup-key"]
    model_mapping: {{"gpt-5": "bench-up"}}
"""

# The same with the deepseek preset (gpt-5 -> deepseek-chat): on the OpenCode-size body the
# request is parsed, fixed (max_tokens 32000 -> 8192, reasoning_content placeholders on its
# four assistant messages) and serialized again: the cost of a preset.
PRESET_CONFIG = CONFIG.replace('"bench-up"', '"deepseek-chat"').replace(
    "    api_keys:", "    preset: deepseek\n    api_keys:")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Procs:
    """Every process this run starts, stopped in `stop_all` whatever happens."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=ROOT, start_new_session=True)
        self.procs.append((name, p))
        return p

    def stop_all(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 5
        for _, p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log_tail(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-2000:]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def loadgen(spec: dict) -> dict:
    out = subprocess.run([PY, str(HERE / "loadgen.py"), json.dumps(spec)], capture_output=True,
                         timeout=spec.get("timeout", 300) + 30, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen {spec} failed: {out.stderr.decode()[-1500:]}")
    return json.loads(out.stdout)


class RssSampler:
    """Peak RSS of a process while something runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.005)

    def __enter__(self):
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run (< 60 s); figures are rough")
    ap.add_argument("--mitmdump", default=str(Path(PY).parent / "mitmdump"),
                    help="the mitmdump to measure (default: next to this Python)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SCRIPT",
                    help="an extra gateway column: mitmdump -s SCRIPT (e.g. httpx=bench/gateway_httpx.py)")
    ap.add_argument("--no-preset", action="store_true",
                    help="leave out the `preset` column (the gateway with the deepseek preset)")
    ap.add_argument("--rewrite", action="store_true",
                    help="an extra gateway column, 'rewrite': the same config with rewrite_response_model: true")
    ap.add_argument("--repeat", type=int, help="repetitions of each figure (default 3, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per throughput figure (default 3, quick 1)")
    ap.add_argument("--only", help="comma list of phases: requests,rps,sse,stream,session")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    quick = args.quick
    repeat = args.repeat or (1 if quick else 3)
    duration = args.duration or (1.0 if quick else 3.0)
    warmup = 0.3 if quick else 0.5
    counts = (500, 2000) if quick else (2000, 10000)
    stream_events = 20_000 if quick else 100_000
    sse_repeat = 10 if quick else 30
    phases = set((args.only or "requests,rps,sse,stream,session").split(","))

    # A safety net: never leave anything running for long.
    signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("benchmark took too long")))
    signal.alarm(150 if quick else 1800)

    tmp = Path(tempfile.mkdtemp(prefix="ccx-bench-"))
    procs = Procs(tmp)
    ports = {"upstream": free_port()}
    up = ports["upstream"]
    (tmp / "ccx.yaml").write_text(CONFIG.format(up=up))
    (tmp / "ccx-preset.yaml").write_text(PRESET_CONFIG.format(up=up))
    (tmp / "ccx-rewrite.yaml").write_text("rewrite_response_model: true\n" + CONFIG.format(up=up))
    mitmdump = args.mitmdump
    common = [mitmdump, "-q", "--set", "termlog_verbosity=error"]
    servers = {
        "bare": common + ["--mode", f"reverse:http://127.0.0.1:{up}@127.0.0.1:{{port}}"],
        "bare-stream": common + ["--mode", f"reverse:http://127.0.0.1:{up}@127.0.0.1:{{port}}",
                                 "-s", str(HERE / "stream_addon.py")],
    }
    gateway_args = ["--mode", "reverse:http://127.0.0.1:9@127.0.0.1:{port}", "--set", "connection_strategy=lazy"]
    addon = str(ROOT / "ccx_addon" / "addon.py")
    gateways = {"gateway": (addon, tmp / "ccx.yaml")}
    if not args.no_preset:
        gateways["preset"] = (addon, tmp / "ccx-preset.yaml")
    for v in args.variant:
        name, _, script = v.partition("=")
        gateways[name] = (str(Path(script).resolve()), tmp / "ccx.yaml")
    if args.rewrite:
        gateways["rewrite"] = (addon, tmp / "ccx-rewrite.yaml")
    for name, (script, config_path) in gateways.items():
        servers[name] = common + ["-s", script] + gateway_args + ["--set", f"ccx_config={config_path}"]
    pids = {}
    results: dict = {"mitmproxy": None, "python": sys.version.split()[0], "quick": quick, "figures": {}}
    figures = results["figures"]
    failures = []

    def record(key, cfg, value):
        figures.setdefault(key, {}).setdefault(cfg, []).append(value)

    def check(spec_desc, out):
        if out.get("errors"):
            failures.append(f"{spec_desc}: {out['errors']}")

    try:
        results["mitmproxy"] = subprocess.run([mitmdump, "--version"], capture_output=True, text=True,
                                              timeout=30).stdout.split("\n")[0]
        p = procs.start("upstream", [PY, str(HERE / "upstream.py"), str(up)])
        wait_port(up, p)
        pids["direct"] = p.pid
        for name, argv in servers.items():
            ports[name] = free_port()
            p = procs.start(name, [a.replace("{port}", str(ports[name])) for a in argv])
            pids[name] = p.pid
        for name in servers:
            try:
                wait_port(ports[name], procs.procs[[n for n, _ in procs.procs].index(name)][1])
            except Exception as e:
                raise RuntimeError(f"{name} did not start: {e}\n{procs.log_tail(name)}") from None
        ports["direct"] = up
        gw = list(gateways)
        rps_cfgs = ["direct", "bare"] + gw
        sse_cfgs = ["direct", "bare", "bare-stream"] + gw

        def rotate(cfgs, i):
            return cfgs[i % len(cfgs):] + cfgs[:i % len(cfgs)]

        if "requests" in phases:
            # RSS after N requests, on fresh processes (30 KB bodies, 16 clients).
            for cfg in ["bare"] + gw:
                port = ports[cfg]
                loadgen({"mode": "count", "port": port, "conns": 16, "count": 50, "body": "small"})
                record("rss_start_mb", cfg, rss_mb(pids[cfg]))
                done = 0
                for n in counts:
                    out = loadgen({"mode": "count", "port": port, "conns": 16, "count": n - done, "body": "opencode"})
                    check(f"{cfg} count", out)
                    done = n
                    record(f"rss_after_{n}_mb", cfg, rss_mb(pids[cfg]))
                record("rss_growth_mb", cfg, figures[f"rss_after_{counts[1]}_mb"][cfg][-1]
                       - figures[f"rss_after_{counts[0]}_mb"][cfg][-1])
                print(f"  requests: {cfg} done", file=sys.stderr, flush=True)

        if "rps" in phases:
            i = 0
            for body in ("small", "opencode"):
                for conns in (1, 16):
                    for r in range(repeat):
                        for cfg in rotate(rps_cfgs, i):
                            cpu0 = cpu_seconds(pids[cfg])
                            out = loadgen({"mode": "rps", "port": ports[cfg], "conns": conns, "duration": duration,
                                           "warmup": warmup, "body": body})
                            cpu = cpu_seconds(pids[cfg]) - cpu0
                            check(f"{cfg} rps {body} c={conns}", out)
                            for k in ("rps", "p50_ms", "p99_ms"):
                                record(f"{body}_c{conns}_{k}", cfg, out[k])
                            # CPU time the server process spent per request: robust to
                            # other load on the machine, unlike requests/s.
                            record(f"{body}_c{conns}_cpu_us", cfg, cpu / max(1, out["total"]) * 1e6)
                        i += 1
                    print(f"  rps: {body} c={conns} done", file=sys.stderr, flush=True)

        if "session" in phases:
            # Session affinity's cost: small requests, 1 client, without a session id, with
            # the same one every time (bound key), and with a new one each (bind + evict).
            kinds = ("none", "same", "new")
            for r in range(repeat):
                for cfg in rotate(gw, r):
                    for kind in rotate(list(kinds), r):
                        cpu0 = cpu_seconds(pids[cfg])
                        out = loadgen({"mode": "rps", "port": ports[cfg], "conns": 1, "duration": duration,
                                       "warmup": warmup, "body": "small",
                                       "session": "" if kind == "none" else kind})
                        cpu = cpu_seconds(pids[cfg]) - cpu0
                        check(f"{cfg} session {kind}", out)
                        record(f"session_{kind}_p50_ms", cfg, out["p50_ms"])
                        record(f"session_{kind}_cpu_us", cfg, cpu / max(1, out["total"]) * 1e6)
            print("  session done", file=sys.stderr, flush=True)

        if "sse" in phases:
            for r in range(repeat):
                for cfg in rotate(sse_cfgs, r):
                    out = loadgen({"mode": "sse", "port": ports[cfg], "events": 200, "repeat": sse_repeat})
                    check(f"{cfg} sse", out)
                    record("sse_first_ms", cfg, out["first_ms"])
                    record("sse_total_ms", cfg, out["total_ms"])
            for cfg in sse_cfgs:
                # The upstream pauses 100 ms after the first event: a proxy that holds
                # events back shows a first event after >= 100 ms.
                out = loadgen({"mode": "sse", "port": ports[cfg], "events": 200, "repeat": 3, "pause_ms": 100})
                check(f"{cfg} sse pause", out)
                record("sse_pause_first_ms", cfg, out["first_max_ms"])
            print("  sse done", file=sys.stderr, flush=True)

        if "stream" in phases:
            for cfg in ["bare-stream"] + gw:
                before = rss_mb(pids[cfg])
                with RssSampler(pids[cfg]) as s:
                    out = loadgen({"mode": "stream", "port": ports[cfg], "events": stream_events})
                check(f"{cfg} stream", out)
                record("stream_rss_before_mb", cfg, before)
                record("stream_rss_peak_mb", cfg, s.peak)
                record("stream_rss_growth_mb", cfg, s.peak - before)
                record("stream_seconds", cfg, out["seconds"])
            print("  stream done", file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {k: {cfg: med(v) for cfg, v in per.items()} for k, per in figures.items()}
    results["median"] = summary
    print_table(results, list(gateways), counts, stream_events)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    if failures:
        print("\nFAILED requests:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


def fmt(v, unit=""):
    if v is None:
        return "-"
    if unit == "rps":
        return f"{v:,.0f}"
    if unit == "mb":
        return f"{v:.1f}"
    if unit == "us":
        return f"{v:.0f}"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def print_table(results, gws, counts, stream_events) -> None:
    """One row per figure; the ratio columns compare each gateway with bare mitmdump (for
    SSE and stream rows: with bare-stream, since bare mitmdump buffers whole responses)."""
    m = results["median"]
    cols = ["direct", "bare", "bare-stream"] + gws
    title = f"{results['mitmproxy']} / Python {results['python']}"
    print("\n" + title + ("  (--quick: rough figures)" if results["quick"] else ""))
    heads = ["figure".ljust(38)] + [c.rjust(11) for c in cols] + [f"{g} vs bare".rjust(14) for g in gws] + ["target"]
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in heads) + "|")

    def row(label, key, unit, target="", base="bare", diff=False):
        if key not in m:
            return
        vals = m[key]
        cells = [fmt(vals.get(c), unit) for c in cols]
        ratios = []
        for g in gws:
            a, b = vals.get(g), vals.get(base)
            if a is None or b is None:
                ratios.append("-")
            elif diff:
                ratios.append(f"{a - b:+.2f}" + (" MB" if unit == "mb" else " ms"))
            else:
                ratios.append(f"x{a / b:.2f}" if b else "-")
        print("| " + " | ".join([label.ljust(38)] + [c.rjust(11) for c in cells]
                                + [r.rjust(14) for r in ratios] + [target.ljust(6)]) + " |")

    for body, desc in (("small", "small"), ("opencode", "30 KB")):
        for c in (1, 16):
            row(f"{desc} c={c} req/s", f"{body}_c{c}_rps", "rps", ">=x0.7")
            row(f"{desc} c={c} p50 ms", f"{body}_c{c}_p50_ms", "ms", "<=+1ms" if c == 1 else "", diff=(c == 1))
            row(f"{desc} c={c} p99 ms", f"{body}_c{c}_p99_ms", "ms")
            row(f"{desc} c={c} server CPU us/request", f"{body}_c{c}_cpu_us", "us")
    for kind, desc in (("none", "no session id"), ("same", "one session id"), ("new", "a new session id each")):
        row(f"small c=1, {desc}: p50 ms", f"session_{kind}_p50_ms", "ms")
        row(f"small c=1, {desc}: CPU us/request", f"session_{kind}_cpu_us", "us")
    row("SSE 200 events: first event ms", "sse_first_ms", "ms", "<=+2ms", base="bare-stream", diff=True)
    row("SSE 200 events: total ms", "sse_total_ms", "ms", base="bare-stream")
    row("SSE, 100 ms pause: first event ms", "sse_pause_first_ms", "ms", "<100", base="bare-stream", diff=True)
    row(f"stream {stream_events:,} events: RSS growth MB", "stream_rss_growth_mb", "mb", "<20", base="bare-stream", diff=True)
    row(f"stream {stream_events:,} events: peak RSS MB", "stream_rss_peak_mb", "mb", base="bare-stream", diff=True)
    row(f"stream {stream_events:,} events: seconds", "stream_seconds", "s", base="bare-stream")
    row("RSS at start MB", "rss_start_mb", "mb")
    for n in counts:
        row(f"RSS after {n:,} requests MB", f"rss_after_{n}_mb", "mb", diff=True)
    row(f"RSS growth {counts[0]:,} -> {counts[1]:,} requests MB", "rss_growth_mb", "mb", "flat", diff=True)
    if "preset" in gws and "gateway" in gws:
        for c in (1, 16):
            p50, cpu = m.get(f"opencode_c{c}_p50_ms", {}), m.get(f"opencode_c{c}_cpu_us", {})
            if p50.get("preset") is not None and p50.get("gateway") is not None:
                print(f"preset vs gateway, 30 KB c={c}: p50 {p50['preset'] - p50['gateway']:+.3f} ms "
                      f"(target <= +0.3 ms at c=1), CPU {cpu['preset'] - cpu['gateway']:+.0f} us/request")
    print("bare-stream: bare mitmdump plus a one-line addon that sets flow.response.stream "
          "(without it mitmdump buffers whole responses); SSE/stream rows compare against it.")


if __name__ == "__main__":
    sys.exit(main())
