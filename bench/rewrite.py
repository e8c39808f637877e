"""What `rewrite_response_model` costs per streamed event, in-process (no network, no
mitmproxy): the CPU time of handover's transform step for the events of bench/payloads.py,
fed as the upstream sends them (one event per chunk) and cut into 7-byte pieces (the worst
case: every event waits for its line end across many chunks). The time to the first token
grows by the cost of one event; the end-to-end figure is `python bench/run.py --rewrite`.

    python bench/rewrite.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ccx_addon.modelrewrite import ModelRewrite  # noqa: E402
from payloads import EVENT, LAST_EVENTS  # noqa: E402


def per_event_us(chunks: list[bytes], events: int, rounds: int = 20) -> float:
    best = float("inf")
    for _ in range(rounds):
        rewrite = ModelRewrite("gpt-5")
        start = time.perf_counter()
        for chunk in chunks:
            rewrite.feed(chunk)
        rewrite.end()
        best = min(best, time.perf_counter() - start)
    return best / events * 1e6


def main() -> None:
    events = [EVENT] * 200 + [LAST_EVENTS]  # what bench/upstream.py streams
    body = b"".join(events)
    whole = per_event_us(events, len(events))
    sevens = per_event_us([body[i:i + 7] for i in range(0, len(body), 7)], len(events))
    rewrite = ModelRewrite("gpt-5")
    out = rewrite.feed(events[0])
    assert b'"model":"gpt-5"' in out and rewrite.original, out  # it did rewrite
    print(f"Python {sys.version.split()[0]}, {len(events)} events of ~{len(body) // len(events)} bytes")
    print(f"  one event per chunk: {whole:.1f} us per event")
    print(f"  7-byte chunks:       {sevens:.1f} us per event")


if __name__ == "__main__":
    main()
