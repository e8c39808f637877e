"""State shared by the gateway's addons: the config in force, upstream health, and what the
gateway knows about each flow (kept off the flow so nothing unserializable is saved)."""

import dataclasses
import time
import weakref

from mitmproxy import http

from .config import Channel, GatewayConfig
from .forwarding import ForwardResult
from .health import HealthRegistry
from .redact import SECRET_MASK, scrub_bytes
from .sse import StreamCapture

__all__ = ["SECRET_MASK", "FlowRecord", "GatewayState"]


@dataclasses.dataclass
class FlowRecord:
    started: float = dataclasses.field(default_factory=time.time)
    endpoint: str = ""
    requested_model: str = ""
    stream: bool = False
    rejected: str = ""  # the error code when the gateway answered the request itself
    result: ForwardResult | None = None
    handover_token: str = ""
    capture: StreamCapture | None = None
    stream_failure: str | None = None
    client_gone: bool = False
    # The request as the client sent it (credentials masked), for the flow view: the flow
    # itself is rewritten to show what went upstream.
    client_request: dict = dataclasses.field(default_factory=dict)
    session: str = ""  # a short label of the client's session id (not a secret)
    # Refused from the headers alone: the answer comes from the hand-over server while
    # mitmproxy drops the body (access.py, EarlyAnswers). Holds the flow's original (scheme,
    # host, port, header fields), shown again once answered; later hooks leave it alone.
    answered_early: tuple = ()
    close_connection: bool = False  # the client asked for it (or speaks HTTP/1.0)
    # Ids of the flows that show this request's failed upstream attempts (attemptflows.py).
    attempt_flows: list[str] = dataclasses.field(default_factory=list)
    # A replay (replay.py): the flow it replays, and the channel it is pinned to.
    replay_of: str = ""
    pinned_channel: Channel | None = None
    # Tokens on every stream (usagechunk.py): whether the client asked for usage itself,
    # and the usage taken out of a stream it did not ask for it in.
    usage_requested: bool = False
    removed_usage: dict | None = None


class GatewayState:
    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.health: HealthRegistry | None = None
        self.records: weakref.WeakKeyDictionary[http.HTTPFlow, FlowRecord] = weakref.WeakKeyDictionary()
        # Channel name -> (base URL, model ids) of upstream /models lists (catalog.py).
        self.upstream_models: dict[str, tuple[str, tuple[str, ...]]] = {}
        # The loopback hand-over server (set when it listens): the only server the proxy
        # may connect to (backstop.py), and where early refusals are answered (access.py).
        self.handover = None
        self.max_body_size = 50 * 1024 * 1024  # option ccx_max_body_size (access.py)

    def install(self, config: GatewayConfig) -> None:
        """Put a new config in force. Requests in flight keep the objects they started with."""
        self.config = config
        self.health = HealthRegistry(config, previous=self.health)

    def scrub(self, data: bytes) -> bytes:
        return data if self.config is None else scrub_bytes(data, self.config.secrets)
