"""Session affinity stays bounded: 100,000 distinct sessions through a real
`mitmdump -s ccx_addon/addon.py` subprocess keep at most `max_sessions` bindings, and the
process's memory stops growing once the store is full. Figures print with `pytest -s`.

The client is raw asyncio keep-alive sockets and the upstream is bench/upstream.py (a separate
process answering pre-built JSON), so the gateway is the only slow part.
"""

import asyncio
import subprocess
import sys

import httpx
import pytest

from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from harness import ROOT, free_port
from gateway_process import start_gateway

SESSIONS = 100_000
MAX_SESSIONS = 10_000  # the default
CONNECTIONS = 16
BODY = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def send_sessions(port: int, first: int, count: int) -> int:
    """`count` requests, each with its own OpenCode-like session id; returns how many got 200."""
    ok = 0
    next_id = first
    end = first + count

    async def client():
        nonlocal ok, next_id
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while next_id < end:
                session = f"ses_{next_id:012d}a7Kq9ZbX2mWc4R"
                next_id += 1
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                    b"content-type: application/json\r\nauthorization: Bearer " + PROXY_KEY.encode()
                    + b"\r\nx-session-id: " + session.encode()
                    + b"\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
                ok += head.startswith(b"HTTP/1.1 200 ")
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    return ok


def bound_sessions(gw) -> dict[str, int]:
    # /health shows channel state only with the proxy key.
    payload = httpx.get(gw.url + "/health", headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=10).json()
    return {k["key"]: k["sessions"] for k in payload["channels"]["pool"]["keys"]}


@pytest.mark.slow  # ~3 minutes on 2 busy cores: `-m "not slow"` leaves it out while iterating
def test_100000_sessions_keep_the_binding_store_and_memory_bounded(write_config, tmp_path):
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), str(up_port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
    gw = None
    try:
        assert upstream.stdout.readline().strip() == b"ready"
        cfg = config(channel("pool", f"http://127.0.0.1:{up_port}/v1", keys=UPSTREAM_KEYS))
        gw = start_gateway(write_config(cfg), tmp_path, "-q")
        pid = gw.process.pid

        figures = {}
        done = 0
        for target in (2_000, MAX_SESSIONS * 2, 60_000, SESSIONS):
            assert asyncio.run(send_sessions(gw.port, done, target - done)) == target - done
            done = target
            figures[target] = rss_mb(pid)
            if target == 2_000:
                assert sum(bound_sessions(gw).values()) == 2_000  # every session was bound
        counts = bound_sessions(gw)
        print(f"\nRSS of mitmdump after N distinct sessions (MB): {figures}; bindings per key: {counts}")
        # The store is full and no larger; the keys share the sessions.
        assert sum(counts.values()) == MAX_SESSIONS
        assert min(counts.values()) > MAX_SESSIONS // 4
        # Once the store is full, 80,000 more sessions add no memory to speak of (unbounded,
        # they would take ~40 MB: see the figure printed by the test below).
        assert figures[SESSIONS] - figures[MAX_SESSIONS * 2] < 8, figures
    finally:
        if gw is not None:
            gw.stop()
        upstream.terminate()
        upstream.wait(10)


def test_what_one_binding_costs():
    """The per-session figure behind the default max_sessions (printed with -s)."""
    import tracemalloc

    from ccx_addon.config import AffinitySettings, Channel
    from ccx_addon.health import KeyPool, SessionBindings

    pool = KeyPool(Channel(name="pool", base_url="http://127.0.0.1:1/v1", api_keys=("a", "b", "c")))
    store = SessionBindings(AffinitySettings(max_sessions=SESSIONS))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(SESSIONS):
        now = 1.0 + i * 1e-3
        pool.pick(now, set(), store.choice(f"ses_{i:012d}a7Kq9ZbX2mWc4R", now))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(store) == SESSIONS
    per_session = used / SESSIONS
    print(f"\none binding, its 30-character id included: {per_session:.0f} bytes; "
          f"{SESSIONS:,} sessions: {used / 2**20:.1f} MB")
    assert 50 < per_session < 1000
