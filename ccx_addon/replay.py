"""Replay in mitmweb (Replay, Duplicate → Replay, Edit → Replay) of a chat flow: the flow
shows the request as its upstream received it, with the key masked, so sending it as it is
gets a 401. Instead the replayed request goes through the gateway's own forwarder, pinned
to the channel the flow shows, which sends the channel's real key at send time: the key
never enters the flow."""

import logging

from mitmproxy import http

from .access import mask_credentials, reject
from .config import Channel, GatewayConfig
from .state import FlowRecord, GatewayState

logger = logging.getLogger(__name__)

NOT_REPLAYABLE = (
    "Only flows an upstream answered can be replayed from mitmweb: this one was answered by the "
    "gateway itself (refused, or no channel could serve it), and its request shows the proxy key "
    "masked. Send the request again from your client."
)


def replay_target(config: GatewayConfig, shown: dict) -> tuple[Channel | None, str]:
    """The channel a replayed flow goes to (from the flow's `ccx` metadata), or None and
    what to tell the user. The key the flow was served with must still exist: a replay is
    meant to repeat what happened."""
    name = shown.get("channel")
    channel = next((c for c in config.channels if c.name == name), None)
    if channel is None or channel.is_echo:
        return None, (f"The replayed flow was served by channel {name!r}, which is no longer in the gateway's "
                      f"config. Send the request again from your client, or restore the channel and reload.")
    label = shown.get("key") or ""
    number = label.rsplit("#", 1)[-1]
    if not channel.active or not number.isdigit() or int(number) > len(channel.api_keys):
        return None, (f"The replayed flow was served with key {label or '?'} of channel {name!r}, which no "
                      f"longer exists (the channel has {len(channel.api_keys)} key(s) now). Send the request "
                      f"again from your client, or restore the key and reload.")
    return channel, ""


class ReplayRouter:
    """Takes replayed gateway flows before the access check (their key is the mask)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay != "request" or flow.response or self.state.config is None:
            return
        shown = flow.metadata.get("ccx")
        if not shown:
            return  # not a gateway flow: the access check decides
        mask_credentials(flow.request.headers)
        record = FlowRecord(endpoint="chat", replay_of=shown.get("replay_of") or shown.get("flow_id") or flow.id)
        self.state.records[flow] = record
        if not shown.get("channel"):
            reject(flow, record, 409, NOT_REPLAYABLE, "replay_not_possible")
            return
        channel, problem = replay_target(self.state.config, shown)
        if channel is None:
            reject(flow, record, 410, problem, "replay_target_gone")
            return
        record.pinned_channel = channel
        logger.info(f"replaying flow {record.replay_of[:8]} through channel {channel.name}")
