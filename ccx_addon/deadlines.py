"""Read deadlines for clients: a connection that does not finish a request's headers, or its
body, in time is closed. mitmproxy itself only closes a connection after 600 s without any
byte (a 1-byte-a-minute client, slowloris, is held forever).

- headers: from the moment a connection opens, or its previous answer ended, the next
  request's headers must be complete within `ccx_header_timeout` (an idle keep-alive
  connection is closed then too, as web servers do);
- body: once the headers are in, the body must be complete within `ccx_body_timeout`;
  the client gets a 408 before the connection closes.

mitmproxy has no hook to close a client connection; this uses the one its own inactivity
watchdog uses (`ConnectionHandler.on_timeout`, the same in 11.0 and 12.x).
"""

import asyncio
import logging

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http import http1

from .access import body_follows
from .errors import error_response

logger = logging.getLogger(__name__)


class ClientDeadlines:
    def __init__(self) -> None:
        self.header_timeout = 60.0
        self.body_timeout = 300.0
        self._timers: dict[str, asyncio.TimerHandle] = {}  # by client connection id
        self._closing: set[asyncio.Task] = set()  # referenced until done (asyncio keeps weak refs)

    def load(self, loader) -> None:
        loader.add_option(
            "ccx_header_timeout", int, 60,
            "ccx-addon: seconds a client connection may take to send a request's headers, "
            "counted from when it opened or its previous answer ended; then it is closed. 0: no limit.",
        )
        loader.add_option(
            "ccx_body_timeout", int, 300,
            "ccx-addon: seconds a client may take to send a request body after its headers; "
            "then it gets 408 and the connection is closed. 0: no limit.",
        )

    def configure(self, updated) -> None:
        for name in ("ccx_header_timeout", "ccx_body_timeout"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name}: must be 0 (no limit) or a number of seconds")
        self.header_timeout = ctx.options.ccx_header_timeout
        self.body_timeout = ctx.options.ccx_body_timeout

    def client_connected(self, client: connection.Client) -> None:
        self._arm(client.id, self.header_timeout, self._headers_late, client.id)

    def client_disconnected(self, client: connection.Client) -> None:
        self._disarm(client.id)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn.id)
        if body_follows(flow.request):
            self._arm(flow.client_conn.id, self.body_timeout, self._body_late, flow)

    def request(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn.id)

    def response(self, flow: http.HTTPFlow) -> None:
        # The next request on this connection may come now.
        if flow.client_conn.connected:
            self._arm(flow.client_conn.id, self.header_timeout, self._headers_late, flow.client_conn.id)

    def error(self, flow: http.HTTPFlow) -> None:
        self._disarm(flow.client_conn.id)

    def done(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _arm(self, client_id: str, timeout: float, callback, *args) -> None:
        self._disarm(client_id)
        if timeout > 0:
            self._timers[client_id] = asyncio.get_running_loop().call_later(timeout, callback, *args)

    def _disarm(self, client_id: str) -> None:
        if (timer := self._timers.pop(client_id, None)) is not None:
            timer.cancel()

    def _headers_late(self, client_id: str) -> None:
        self._timers.pop(client_id, None)
        logger.info(f"ccx-addon: closing a client connection: no complete request headers "
                    f"within {self.header_timeout:g}s (ccx_header_timeout)")
        self._close(client_id, None)

    def _body_late(self, flow: http.HTTPFlow) -> None:
        self._timers.pop(flow.client_conn.id, None)
        message = (f"The request body did not arrive within {self.body_timeout:g}s of its headers "
                   "(option ccx_body_timeout); the connection is closed.")
        logger.warning(f"ccx-addon: {message}")
        # Unless an answer went out already (a request refused from its headers).
        answer = None if flow.response else error_response(
            408, message, "invalid_request_error", "request_timeout", None, {"connection": "close"})
        self._close(flow.client_conn.id, answer)

    def _close(self, client_id: str, answer: http.Response | None) -> None:
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = proxyserver.connections.get(client_id) if proxyserver else None
        if handler is None:
            return
        io = handler.transports.get(handler.client)
        if answer is not None and io is not None and io.writer is not None and not io.writer.is_closing():
            io.writer.write(http1.assemble_response(answer))
        task = asyncio.ensure_future(handler.on_timeout())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
