"""The last addon in the chain: a request the gateway did not handle must not fall through
to the reverse target (the placeholder, or a server the user named with `--mode`).

Two lines of defence behind the fail-closed guard (guard.py): a request no addon answered
gets a 500, and no server connection is opened anywhere but to the gateway's own loopback
hand-over server, so not one byte of a request can reach the reverse target."""

import logging

from mitmproxy import http
from mitmproxy.proxy import server_hooks

from .errors import error_response
from .state import GatewayState

logger = logging.getLogger(__name__)


class UnhandledRequestGuard:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or not flow.live or flow.error:
            return
        record = self.state.records.get(flow)
        if record is not None and (record.handover_token or record.client_gone or record.answered_early):
            return  # handed over to the loopback server, or deliberately dropped
        logger.error(f"ccx-addon: {flow.request.method} {flow.request.path} was not handled (see the error above)")
        flow.response = error_response(
            500,
            "The gateway failed while handling this request: an internal error, described "
            "in the gateway's log.",
            "server_error", "gateway_internal_error",
        )

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        address, handover = data.server.address, self.state.handover
        if address is not None and handover is not None and handover.port and tuple(address[:2]) == ("127.0.0.1", handover.port):
            return
        logger.error(f"ccx-addon: refused to connect to {address}: requests never go to the reverse target")
        data.server.error = "ccx-addon: requests never go to the reverse target"
