"""Start-up defaults: with no `--mode`, `mitmdump -s ccx_addon/addon.py` is the gateway on
127.0.0.1:3000 in reverse mode."""

import asyncio
import logging

from mitmproxy import ctx, exceptions
from mitmproxy.proxy import mode_specs

logger = logging.getLogger(__name__)

# Requests never go to the reverse target (the addon routes every flow itself); it only
# has to be a valid spec. Port 9 (discard) makes any accidental use fail fast.
PLACEHOLDER_TARGET = "http://127.0.0.1:9"


def reverse_mode_spec(listen: str) -> str:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, e.g. 127.0.0.1:3000, got {listen!r}")
    return f"reverse:{PLACEHOLDER_TARGET}@{host}:{port}"


class ReverseModeDefaults:
    _listener_update: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_listen", str, "127.0.0.1:3000",
            "ccx-addon: HOST:PORT to listen on when no --mode is given. Loopback by default; "
            "0.0.0.0:3000 accepts other machines.",
        )

    def configure(self, updated) -> None:
        if not {"mode", "ccx_listen", "connection_strategy"} & set(updated):
            return
        if list(ctx.options.mode) == ["regular"]:
            try:
                spec = reverse_mode_spec(ctx.options.ccx_listen)
            except ValueError as e:
                raise exceptions.OptionsError(f"ccx_listen: {e}") from None
            ctx.options.update(mode=[spec], connection_strategy="lazy")
            self.restart_early_listener()
            return
        reverse = any(
            isinstance(mode_specs.ProxyMode.parse(m), mode_specs.ReverseMode)
            for m in ctx.options.mode
        )
        if reverse and ctx.options.connection_strategy != "lazy":
            # With "eager", mitmproxy connects to the placeholder target as soon as a client
            # connects and drops the client when that fails.
            logger.info("ccx-addon: setting connection_strategy=lazy (required in reverse mode)")
            ctx.options.update(connection_strategy="lazy")

    def restart_early_listener(self) -> None:
        """On Python 3.12+ mitmproxy starts its servers (as an eager task) before it loads
        `-s` scripts, so the default regular-mode listener on *:8080 may already be up, and
        the proxyserver only applies mode changes once it is `running`. Bring the servers in
        line with the mode now: a no-op when nothing was started yet (Python 3.11)."""
        proxyserver = ctx.master.addons.get("proxyserver")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # configured outside of a running master (hook-level tests)
            return
        if proxyserver is None or proxyserver.is_running:
            return
        if len(proxyserver.servers) or proxyserver.servers.is_updating:
            logger.info(
                "ccx-addon: mitmproxy started its default listener before loading this script; "
                f"closing it and listening on {ctx.options.ccx_listen} instead"
            )
        # setup_servers reads the mode when it runs, after any update already under way.
        self._listener_update = loop.create_task(proxyserver.setup_servers())
