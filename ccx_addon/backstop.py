"""The last addon in the chain: a request the gateway did not handle (one of its hooks
crashed, which mitmproxy logs and moves past) must not fall through to the placeholder
reverse target and come back as mitmproxy's HTML 502."""

import logging

from mitmproxy import http

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
        if record is not None and (record.handover_token or record.client_gone):
            return  # handed over to the loopback stream, or deliberately dropped
        logger.error(f"ccx-addon: {flow.request.method} {flow.request.path} was not handled (see the error above)")
        flow.response = error_response(
            500,
            "The gateway failed while handling this request: an internal error, described "
            "in the gateway's log.",
            "server_error", "gateway_internal_error",
        )
