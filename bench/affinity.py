"""What session affinity adds to one request, measured on its own code path in-process (the
end-to-end figures of `bench/run.py --only session` carry ~±10 % noise on a shared machine,
far more than the few µs measured here).

    python bench/affinity.py

Per request, as the gateway runs it: read the session id from the request headers, get the
session's binding, pick the key. Cases: the pick alone (as before this feature), no session id (the pick as before plus two header
look-ups), the same session id (bound key), a new session id each time with the store full
(bind and evict the least recently used). Prints the median of 7 runs in µs per request.
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy import http  # noqa: E402

from ccx_addon.config import parse_config  # noqa: E402
from ccx_addon.gateway import client_session_id  # noqa: E402
from ccx_addon.health import HealthRegistry  # noqa: E402

CONFIG = """
proxy_access_keys: ["k"]
channels:
  - name: pool
    base_url: http://127.0.0.1:9/v1
    api_keys: ["sk-1", "sk-2", "sk-3"]
"""
N = 50_000


def headers(session: str = "") -> http.Headers:
    fields = [("host", "127.0.0.1:3000"), ("authorization", "Bearer x"), ("content-type", "application/json"),
              ("user-agent", "opencode/1.0 ai-sdk/openai-compatible"), ("accept", "text/event-stream")]
    if session:
        fields.append(("x-session-id", session))
    return http.Headers([(k.encode(), v.encode()) for k, v in fields])


def run(case: str) -> float:
    health = HealthRegistry(parse_config(CONFIG, environ={}))
    pool = health.pools["pool"]
    for i in range(health.sessions.settings.max_sessions):  # a full store, as after hours of use
        pool.pick(1.0, set(), health.session_choice(f"ses_{i:021d}", 1.0))
    if case == "new":
        requests = [headers(f"ses_new{i:018d}") for i in range(N)]
    else:
        requests = [headers("ses_0123456789abcdefABCDEF" if case == "same" else "")] * N
    start = time.perf_counter()
    if case == "before":  # the pick as it was: no header look-up, no session
        for h in requests:
            pool.pick(time.time(), set())
    else:
        for h in requests:
            now = time.time()
            session = health.session_choice(client_session_id(h), now)
            pool.pick(now, set(), session)
    return (time.perf_counter() - start) / N * 1e6


def main() -> None:
    cases = ("before", "none", "same", "new")
    results = {case: statistics.median(run(case) for _ in range(7)) for case in cases}
    print(f"Python {sys.version.split()[0]}: µs per request for header look-up, binding and key pick")
    for case, label in (("before", "the pick alone, as before"), ("none", "no session id"),
                        ("same", "same session id"), ("new", "new session id, store full")):
        extra = "" if case == "before" else f"  (+{results[case] - results['before']:.2f})"
        print(f"  {label:28} {results[case]:6.2f}{extra}")


if __name__ == "__main__":
    main()
