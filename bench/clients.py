"""Upstream HTTP clients compared alone (no mitmproxy): CPU time per POST to the fake
upstream, sequential on one keep-alive connection, small and 30 KB bodies.

Usage: python bench/clients.py [--quick]   (starts bench/upstream.py on a free port)
"""

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import payloads  # noqa: E402


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_aiohttp(url, body, n):
    import aiohttp
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False,
                                     skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                                     trust_env=False) as s:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer k", "Accept-Encoding": "identity"}
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)

        async def one():
            async with asyncio.timeout(300):
                r = await s.post(url, data=body, headers=headers, allow_redirects=False, timeout=timeout)
            out = bytearray()
            while chunk := await r.content.read(65536):
                out += chunk
            r.release()
            return bytes(out)
        return await measure(one, n)


async def run_httpx(url, body, n):
    import httpx
    async with httpx.AsyncClient(trust_env=False, timeout=None,
                                 limits=httpx.Limits(max_connections=None)) as c:
        headers = {"Content-Type": "application/json", "Authorization": "Bearer k", "Accept-Encoding": "identity"}

        async def one():
            req = c.build_request("POST", url, headers=headers, content=body)
            r = await c.send(req, stream=True)
            out = bytearray()
            async for chunk in r.aiter_raw():
                out += chunk
            await r.aclose()
            return bytes(out)
        return await measure(one, n)


async def measure(one, n):
    for _ in range(min(200, n)):
        await one()
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(n):
        await one()
    return (cpu() - c0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6


def main():
    n = 500 if "--quick" in sys.argv else 3000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    up = subprocess.Popen([sys.executable, os.path.join(HERE, "upstream.py"), str(port)], stdout=subprocess.PIPE)
    try:
        up.stdout.readline()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        print("| client | body | CPU us/request | wall us/request |\n|---|---|---|---|")
        for rep in range(2):
            for name, fn in (("aiohttp", run_aiohttp), ("httpx", run_httpx)):
                for label, body in (("small", payloads.small_body()), ("30 KB", payloads.opencode_body())):
                    c, w = asyncio.run(fn(url, body, n))
                    if rep == 1:
                        print(f"| {name} | {label} | {c:.0f} | {w:.0f} |")
    finally:
        up.terminate()
        up.wait(5)


if __name__ == "__main__":
    main()
