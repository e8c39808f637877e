"""ccx-addon: a mitmproxy addon that turns mitmdump/mitmweb into an OpenAI Chat Completions
gateway with channels, model mapping, key pools and failover."""

__version__ = "0.1.0"


def make_addons() -> list:
    """The gateway's addons, in hook order, sharing one state."""
    from .access import AccessGate
    from .attemptflows import AttemptFlows
    from .backstop import UnhandledRequestGuard
    from .configstore import ConfigStore
    from .contentview import ChatViewAddon
    from .explain import Explain
    from .flowlist import CommentColumn, FlowLimit
    from .flowview import FlowView
    from .gateway import ChatGateway
    from .modes import ReverseModeDefaults
    from .replay import ReplayRouter
    from .state import GatewayState
    from .status import StatusView

    state = GatewayState()
    return [
        ReverseModeDefaults(),
        ConfigStore(state),
        ReplayRouter(state),  # before the access check: a replay shows the masked key
        AccessGate(state),
        ChatGateway(state),
        FlowView(state),
        AttemptFlows(state),
        StatusView(state),
        CommentColumn(),
        FlowLimit(),
        ChatViewAddon(),
        Explain(state),
        UnhandledRequestGuard(state),  # last: answers what the others left unanswered
    ]
