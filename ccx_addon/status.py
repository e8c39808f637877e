"""The status view: `ccx.status` (mitmweb's command bar, mitmproxy; the table also goes to
the log; in mitmdump `kill -USR1 PID` logs it) and `GET /ccx/status` (authenticated with the
proxy key, for `ccx-addon status`)."""

import asyncio
import json
import logging
import signal
import time

from mitmproxy import command, http

from .errors import json_response
from .state import GatewayState
from .statusreport import Counters, format_status

logger = logging.getLogger(__name__)


class StatusView:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.counters = Counters()

    def running(self) -> None:
        # mitmdump has no command bar: `kill -USR1 <pid>` writes the table to its log.
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.status)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError):
            pass  # not the main thread (an embedded master), or no such signal (Windows)

    def done(self) -> None:
        try:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        except (RuntimeError, ValueError, NotImplementedError, AttributeError):
            pass

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # After the access check: only a client with the proxy key gets here unanswered.
        record = self.state.records.get(flow)
        if record is not None and record.endpoint == "status" and flow.response is None:
            flow.response = json_response(200, json.dumps(self.snapshot()).encode())

    def response(self, flow: http.HTTPFlow) -> None:
        self.count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.count(flow)

    def count(self, flow: http.HTTPFlow) -> None:
        record = self.state.records.get(flow)
        if record is not None and record.endpoint == "chat" and not record.rejected:
            self.counters.count(flow.metadata.get("ccx") or {})

    def snapshot(self) -> dict:
        """Non-secret state: key labels, never keys."""
        config, health = self.state.config, self.state.health
        now = time.time()
        # Sessions bound per key (affinity) and limits reached (key rpm/concurrency).
        shared = health.snapshot(now)
        channels = []
        for channel in config.channels:
            pool, breaker = health.pools[channel.name], health.breakers[channel.name]
            keys = shared[channel.name]["keys"]
            channels.append({
                "name": channel.name, "active": channel.active,
                "breaker": {"state": breaker.state, "open_until": breaker.open_until},
                "keys": [{"key": channel.key_label(i), "disabled": s.disabled or None, "cooling_until": s.cooling_until,
                          "sessions": keys[i].get("sessions", 0), "at_limit": keys[i].get("at_limit")}
                         for i, s in enumerate(pool.states) if channel.api_keys],
                **self.counters.channels[channel.name].as_dict(),
            })
        return {"since": self.counters.started, "now": now, "channels": channels}

    @command.command("ccx.status")
    def status(self) -> str:
        """Each channel's keys (ready, cooling, disabled), circuit breaker, requests, failures,
        tokens and median time to first token since start. Also written to the log."""
        table = format_status(self.snapshot())
        logger.info(table)
        return table
