"""Keeps the gateway's per-request log lines off mitmproxy's deprecated `add_log` event
while no addon listens to it.

mitmproxy hands every log record to a handler (`LegacyLogEvents`) that re-sends it as the
`add_log` event, deprecated since mitmproxy 9 and implemented by no built-in addon: one
event loop wake-up and one dispatch over every addon per record. For the summary line the
flow view logs per request that was the largest single cost of the gateway (about 70 µs of
CPU a request, see README, "Performance"). The terminal, mitmweb's event log and any other
logging handler still get every record; warnings and errors, and records of other loggers,
go to `add_log` as before, and so does everything once an addon with an `add_log` hook is
loaded (checked at most once a second).
"""

import logging
import time

from mitmproxy import addonmanager
from mitmproxy import log as mitmproxy_log

RECHECK_INTERVAL = 1.0


class SkipUnheardLegacyEvents(logging.Filter):
    def __init__(self, master) -> None:
        super().__init__()
        self.master = master
        self._checked_at = float("-inf")
        self._heard = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or not record.name.startswith("ccx_addon"):
            return True
        now = time.monotonic()
        if now - self._checked_at > RECHECK_INTERVAL:
            self._checked_at = now
            self._heard = any(
                callable(getattr(addon, "add_log", None))
                for addon in addonmanager.traverse(self.master.addons.chain)
            )
        return self._heard


def install(master) -> list[tuple[logging.Handler, logging.Filter]]:
    """Attach the filter to `master`'s legacy-event handler; returns what to `uninstall`."""
    legacy = getattr(mitmproxy_log, "LegacyLogEvents", None)
    if legacy is None or master is None:
        return []
    installed = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, legacy) and getattr(handler, "master", None) is master:
            log_filter = SkipUnheardLegacyEvents(master)
            handler.addFilter(log_filter)
            installed.append((handler, log_filter))
    return installed


def uninstall(installed: list[tuple[logging.Handler, logging.Filter]]) -> None:
    for handler, log_filter in installed:
        handler.removeFilter(log_filter)
    installed.clear()
