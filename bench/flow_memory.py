"""mitmweb's RSS after N requests of S MB through the gateway (issue 9, item 8).

Starts bench/upstream.py and `mitmweb -s ccx_addon/addon.py` on 127.0.0.1, sends N
non-streaming requests with an S MB prompt one after another, and prints mitmweb's RSS
before, after, and after a short rest. Every process it starts is stopped.

Usage: python bench/flow_memory.py [--requests 30] [--mb 20] [--mitmweb PATH] [--set OPTION=VALUE ...]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-proxy-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--mb", type=float, default=20)
    parser.add_argument("--mitmweb", default=str(Path(sys.executable).parent / "mitmweb"))
    parser.add_argument("--set", action="append", default=[], help="extra mitmproxy option")
    args = parser.parse_args()

    up_port, port, web_port = free_port(), free_port(), free_port()
    workdir = Path(tempfile.mkdtemp(prefix="ccx-flow-memory-"))
    cfg = workdir / "ccx.yaml"
    cfg.write_text(f'proxy_access_keys: ["{KEY}"]\nchannels:\n  - name: up\n'
                   f'    base_url: http://127.0.0.1:{up_port}/v1\n    api_keys: ["bench-upstream-key"]\n')
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), str(up_port)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    extra = [a for option in args.set for a in ("--set", option)]
    web = subprocess.Popen(
        [args.mitmweb, "-s", str(ROOT / "ccx_addon" / "addon.py"), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
         "--set", "connection_strategy=lazy", "--set", f"ccx_config={cfg}", "--set", "web_open_browser=false",
         "--set", f"web_port={web_port}", "--set", "web_password=bench-web-token", *extra],
        stdout=(workdir / "mitmweb.log").open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        upstream.stdout.readline()
        wait_up(f"http://127.0.0.1:{port}/health")
        time.sleep(1)
        before = rss_mb(web.pid)
        prompt = "x" * int(args.mb * 1024 * 1024)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}]}).encode()
        with httpx.Client(timeout=120) as client:
            for _ in range(args.requests):
                answer = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=body,
                                     headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
                answer.raise_for_status()
        after = rss_mb(web.pid)
        time.sleep(3)
        rested = rss_mb(web.pid)
        print(json.dumps({"requests": args.requests, "mb_each": args.mb, "options": args.set,
                          "rss_mb_before": round(before), "rss_mb_after": round(after),
                          "rss_mb_after_3s": round(rested)}))
    finally:
        for process in (web, upstream):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
