"""`ccx-addon`: start the gateway (mitmdump, or mitmweb with --web) with its defaults.

    ccx-addon [--web] [--config FILE] [--listen HOST:PORT] [any mitmproxy option ...]
"""

import argparse
import sys
from pathlib import Path

ADDON_SCRIPT = Path(__file__).resolve().parent / "addon.py"


def mitmproxy_args(config: str | None, listen: str | None, extra: list[str]) -> list[str]:
    args = ["-s", str(ADDON_SCRIPT)]
    if config:
        args += ["--set", f"ccx_config={config}"]
    if listen:
        args += ["--set", f"ccx_listen={listen}"]
    return args + extra


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ccx-addon",
        description="Start the ccx-addon gateway: mitmdump (or mitmweb) in reverse mode on "
        "127.0.0.1:3000 serving OpenAI Chat Completions. Other arguments go to mitmproxy.",
    )
    parser.add_argument("--web", action="store_true", help="run mitmweb (flow view in the browser) instead of mitmdump")
    parser.add_argument("--config", help="config file (default: config/ccx.yaml)")
    parser.add_argument("--listen", help="HOST:PORT to listen on (default: 127.0.0.1:3000)")
    known, extra = parser.parse_known_args(argv)

    from mitmproxy.tools.main import mitmdump, mitmweb

    tool = mitmweb if known.web else mitmdump
    return tool(mitmproxy_args(known.config, known.listen, extra)) or 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))
