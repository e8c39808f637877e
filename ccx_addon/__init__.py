"""ccx-addon: a mitmproxy addon that turns mitmdump/mitmweb into an OpenAI Chat Completions
gateway with channels, model mapping, key pools and failover."""

__version__ = "0.1.0"


def make_addons() -> list:
    """The gateway's addons, in hook order, sharing one state. Every request-path hook is
    wrapped to fail closed (guard.py): add new addons to this list and they are covered."""
    from .access import AccessGate, EarlyAnswers
    from .attemptflows import AttemptFlows
    from .backstop import UnhandledRequestGuard
    from .catalog import ModelCatalog
    from .configstore import ConfigStore
    from .contentview import ChatViewAddon
    from .deadlines import ClientDeadlines
    from .explain import Explain
    from .flowlist import CommentColumn, FlowLimit
    from .flowmemory import FlowMemory
    from .flowview import FlowView
    from .gateway import ChatGateway
    from .guard import guard_hooks
    from .modes import ReverseModeDefaults
    from .protocolerrors import ProtocolErrors
    from .replay import ReplayRouter
    from .state import GatewayState
    from .status import StatusView
    from .webauth import WebApiGuard

    state = GatewayState()
    gateway = ChatGateway(state)
    return guard_hooks([
        ReverseModeDefaults(),
        WebApiGuard(),  # mitmweb without its own authentication (mitmproxy 11.0) gets a token
        ProtocolErrors(),
        ClientDeadlines(),
        ConfigStore(state),
        ReplayRouter(state),  # before the access check: a replay shows the masked key
        AccessGate(state),
        ModelCatalog(state, gateway.client),  # before the gateway: stopped before its client closes
        gateway,
        FlowView(state),
        FlowMemory(state),  # after FlowView: cuts bodies once a flow is finished
        AttemptFlows(state),
        StatusView(state),
        CommentColumn(),
        FlowLimit(),
        ChatViewAddon(),
        Explain(state),
        EarlyAnswers(state),  # after every other requestheaders hook
        UnhandledRequestGuard(state),  # last: answers what the others left unanswered
    ], state)
