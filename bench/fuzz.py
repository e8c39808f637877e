"""The raw-socket fuzzer of tests/test_hardening.py, longer, with figures.

    python bench/fuzz.py [--cases 10000] [--seed 9] [--most-headers 20000] [--source DIR]

Starts a healthy fake upstream, a reverse target that records whatever reaches it, and
`mitmdump -s ccx_addon/addon.py` in front of both (127.0.0.1 only; everything it starts is
stopped). Prints the answers by status and by kind of case, and every problem: a 5xx, an
answer not in OpenAI's shape or not from the gateway, a key in an answer, bytes at the
reverse target, a traceback in the gateway's log. Exits non-zero when there is a problem.
`--source DIR` runs the gateway from another checkout (e.g. the code before a change).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import rawfuzz  # noqa: E402
from fakeupstream import FakeUpstream  # noqa: E402
from gateway_process import start_gateway  # noqa: E402
from reversetarget import RecordingTarget  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--most-headers", type=int, default=20_000)
    parser.add_argument("--source", type=Path, default=None, help="a checkout whose ccx_addon/addon.py to run")
    args = parser.parse_args()

    upstream = FakeUpstream().start()
    target = RecordingTarget().start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ccx.yaml"
        config.write_text(rawfuzz.gateway_config(upstream.url))
        script = (args.source / "ccx_addon" / "addon.py") if args.source else None
        # addon.py imports the installed package first: put the other checkout before it.
        env = {"PYTHONPATH": str(args.source)} if args.source else None
        gw = start_gateway(config, Path(tmp), *rawfuzz.FUZZ_OPTIONS, reverse_target=target.url, script=script, env=env)
        started = time.monotonic()
        try:
            figures = rawfuzz.run(gw.port, rawfuzz.make_cases(args.seed, args.cases, args.most_headers))
        finally:
            elapsed = time.monotonic() - started
            log = gw.log()
            gw.stop()
            upstream.stop()
            target.stop()
    report(figures, elapsed, target.received, rawfuzz.log_problems(log))
    return 1 if figures["problems"] or target.received or rawfuzz.log_problems(log) else 0


def report(figures: dict, elapsed: float, at_target: list, log_lines: list) -> None:
    cases = figures["cases"]
    print(f"{cases} cases in {elapsed:.1f}s: {figures['answered']} answered, {figures['closed']} closed without an answer")
    print("answers by status:", ", ".join(f"{k}: {v}" for k, v in sorted(figures["by_status"].items(), key=str)))
    for kind, counts in sorted(figures["by_kind"].items()):
        print(f"  {kind:<20} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str)))
    print(f"problems in answers: {len(figures['problems'])} ({100 * len(figures['problems']) / max(cases, 1):.2f}% of cases)")
    for kind, problem, data in figures["problems"][:15]:
        print(f"  {kind}: {problem}  <- {data[:80]!r}")
    print(f"connections that reached the reverse target: {len(at_target)}")
    print(f"traceback / addon error lines in the gateway log: {len(log_lines)}")
    for line in log_lines[:5]:
        print("  " + line[:160])


if __name__ == "__main__":
    sys.exit(main())
