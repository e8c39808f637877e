"""`ccx-addon`: start the gateway (mitmdump, or mitmweb with --web) with its defaults, or
look at a config without starting anything.

    ccx-addon [--web] [--config FILE] [--listen HOST:PORT] [any mitmproxy option ...]
    ccx-addon check [--config FILE]
    ccx-addon explain MODEL [--config FILE]
    ccx-addon opencode-config [--config FILE] [--listen HOST:PORT] [--model NAME ...]
    ccx-addon status [--url http://127.0.0.1:3000]   (asks a running gateway; PROXY_ACCESS_KEY)
"""

import argparse
import os
import sys
from pathlib import Path

ADDON_SCRIPT = Path(__file__).resolve().parent / "addon.py"
DEFAULT_LISTEN = "127.0.0.1:3000"
SUBCOMMANDS = ("check", "explain", "opencode-config", "status")
# explain and opencode-config only need the routing: a shell without the proxy key set
# should still get an answer (the key itself is never printed either way).
PLACEHOLDER_PROXY_KEY = "placeholder-for-ccx-addon-cli"


def mitmproxy_args(config: str | None, listen: str | None, extra: list[str]) -> list[str]:
    args = ["-s", str(ADDON_SCRIPT)]
    if config:
        args += ["--set", f"ccx_config={config}"]
    if listen:
        args += ["--set", f"ccx_listen={listen}"]
    return args + default_mode_args(listen, extra) + extra


def default_mode_args(listen: str | None, extra: list[str]) -> list[str]:
    """An explicit reverse mode when the user gave none. The addon sets the same default
    itself, but mitmproxy 12 on Python 3.12 starts its servers before it loads `-s`
    scripts, and would listen on *:8080 first."""
    if any(a in ("--mode", "-m") or a.startswith(("--mode=", "mode=")) for a in extra):
        return []
    from .modes import reverse_mode_spec

    for i, arg in enumerate(extra[:-1]):
        if arg == "--set" and extra[i + 1].startswith("ccx_listen="):
            listen = extra[i + 1].split("=", 1)[1]
    return ["--mode", reverse_mode_spec(listen or DEFAULT_LISTEN), "--set", "connection_strategy=lazy"]


def run(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return run_subcommand(argv)
    parser = argparse.ArgumentParser(
        prog="ccx-addon",
        description="Start the ccx-addon gateway: mitmdump (or mitmweb) in reverse mode on "
        "127.0.0.1:3000 serving OpenAI Chat Completions. Other arguments go to mitmproxy.",
        epilog="Without starting anything: ccx-addon check | explain MODEL | opencode-config "
        "(see ccx-addon check --help).",
    )
    parser.add_argument("--web", action="store_true", help="run mitmweb (flow view in the browser) instead of mitmdump")
    parser.add_argument("--config", help="config file (default: config/ccx.yaml)")
    parser.add_argument("--listen", help="HOST:PORT to listen on (default: 127.0.0.1:3000)")
    known, extra = parser.parse_known_args(argv)
    try:
        args = mitmproxy_args(known.config, known.listen, extra)
    except ValueError as e:
        parser.error(f"--listen: {e}")

    from mitmproxy.tools.main import mitmdump, mitmweb

    tool = mitmweb if known.web else mitmdump
    return tool(args) or 0


def load_for_cli(config: str | None, need_proxy_key: bool):
    from .config import load_config
    from .configstore import DEFAULT_CONFIG, resolve_config_path

    environ = dict(os.environ)
    if not need_proxy_key and not environ.get("PROXY_ACCESS_KEY"):
        environ["PROXY_ACCESS_KEY"] = PLACEHOLDER_PROXY_KEY
    return load_config(resolve_config_path(config or DEFAULT_CONFIG), environ)


def base_url_for(listen: str) -> str:
    """The Base URL a client on this machine uses for a gateway listening on `listen`."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "127.0.0.1", "0.0.0.0", "::", "::1", "localhost"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1"


def run_subcommand(argv: list[str]) -> int:
    if argv[0] == "status":
        return run_status(argv[1:])
    parser = argparse.ArgumentParser(prog="ccx-addon", description="Look at a ccx-addon config without starting the gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a config and print what it would serve")
    explain = commands.add_parser("explain", help="print how a model would be routed (sends nothing)")
    explain.add_argument("model", help="the model name a client would request")
    opencode = commands.add_parser("opencode-config", help="print the opencode.json provider block for this gateway")
    opencode.add_argument("--listen", default=DEFAULT_LISTEN, help="HOST:PORT the gateway listens on (default: 127.0.0.1:3000)")
    opencode.add_argument("--model", action="append", default=[], help="add a model to the list (repeatable)")
    for sub in (check, explain, opencode):
        sub.add_argument("--config", help="config file (default: config/ccx.yaml)")
    args = parser.parse_args(argv)

    from . import explain as explaining
    from .config import ConfigError

    try:
        config = load_for_cli(args.config, need_proxy_key=args.command == "check")
    except ConfigError as e:
        print(f"ccx-addon: {e}", file=sys.stderr)
        return 1
    if args.command == "check":
        print(explaining.format_config_summary(config))
    elif args.command == "explain":
        print(explaining.format_explanation(explaining.explain_model(config, args.model)))
    else:
        block = explaining.opencode_provider(config, base_url_for(args.listen), tuple(args.model))
        print(explaining.format_opencode_provider(block))
        if not block["provider"][explaining.PROVIDER_ID]["models"]:
            print("ccx-addon: no active channel names an exact model; add models with --model NAME",
                  file=sys.stderr)
    return 0


def run_status(argv: list[str]) -> int:
    """Ask a running gateway for its status (`GET /ccx/status` with the proxy key from the
    environment, never from the command line where `ps` shows it) and print the table."""
    import json
    import urllib.error
    import urllib.request

    from .errors import STATUS_PATH
    from .statusreport import format_status

    parser = argparse.ArgumentParser(prog="ccx-addon status", description="Print a running gateway's channels, keys, breakers and counts.")
    parser.add_argument("--url", default=f"http://{DEFAULT_LISTEN}", help="the gateway (default: http://127.0.0.1:3000)")
    args = parser.parse_args(argv)
    key = os.environ.get("PROXY_ACCESS_KEY", "")
    if not key:
        print("ccx-addon status: set PROXY_ACCESS_KEY to the gateway's proxy access key", file=sys.stderr)
        return 1
    request = urllib.request.Request(args.url.rstrip("/") + STATUS_PATH, headers={"authorization": f"Bearer {key}"})
    try:
        # Straight to the gateway: an ambient HTTP_PROXY must not receive the proxy key.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            status = json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        print(f"ccx-addon status: the gateway answered {e.code}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"ccx-addon status: cannot reach a gateway at {args.url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    print(format_status(status))
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))
