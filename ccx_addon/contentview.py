"""A mitmproxy content view for chat traffic ("chat"): chosen automatically for Chat
Completions requests and answers in mitmweb, mitmproxy and mitmdump (`--flow-detail 3`),
rendering what chatrender.py assembles. The raw and JSON views stay in the view menu.

mitmproxy 12 replaced the content view API (`Contentview`: `prettify`, `render_priority`
with a `Metadata`); 11 has only the old `View` (a call returning styled lines). Both are
implemented here over the same pure rendering; 12 would load the old one only through a
deprecated wrapper."""

import logging

from mitmproxy import contentviews, http

from .chatrender import render_chat_body

logger = logging.getLogger(__name__)

VIEW_NAME = "Chat"
# Above the built-in JSON view (1) and below nothing a user would expect to win.
PRIORITY = 2.0


def is_chat_flow(flow, message) -> bool:
    """A chat completions exchange, by its path (as the client or the upstream saw it)."""
    if not isinstance(flow, http.HTTPFlow) or not isinstance(message, http.Message):
        return False
    return flow.request.path.split("?", 1)[0].rstrip("/").endswith("/chat/completions")


def render(data: bytes, flow, message) -> str | None:
    if not data or not is_chat_flow(flow, message):
        return None
    return render_chat_body(data, isinstance(message, http.Request))


def priority(data: bytes, flow, message) -> float:
    try:
        return PRIORITY if render(data, flow, message) is not None else 0
    except Exception:  # a view must never break the flow view
        logger.debug("chat view: cannot render", exc_info=True)
        return 0


if hasattr(contentviews, "Contentview"):  # mitmproxy 12+

    class ChatContentview(contentviews.Contentview):
        name = VIEW_NAME

        def prettify(self, data: bytes, metadata) -> str:
            text = render(data, metadata.flow, metadata.http_message)
            if text is None:
                raise ValueError("not a chat completions body")
            return text

        def render_priority(self, data: bytes, metadata) -> float:
            return priority(data, metadata.flow, metadata.http_message)

    def _make_view():
        return ChatContentview()

else:  # mitmproxy 11
    from mitmproxy.contentviews.base import View

    class ChatView(View):
        name = VIEW_NAME

        def __call__(self, data, *, content_type=None, flow=None, http_message=None, **unknown):
            text = render(data, flow, http_message)
            if text is None:
                return None  # mitmproxy falls back to the raw view
            return "Chat", ([("text", line)] for line in text.split("\n"))

        def render_priority(self, data, *, content_type=None, flow=None, http_message=None, **unknown) -> float:
            return priority(data, flow, http_message)

    def _make_view():
        return ChatView()


class ChatViewAddon:
    """Registers the chat content view while the gateway is loaded."""

    def __init__(self) -> None:
        self.view = None

    def load(self, loader) -> None:
        if self.view is None:
            self.view = _make_view()
            _register(self.view)

    def done(self) -> None:
        if self.view is not None:
            _unregister(self.view)
            self.view = None


def _register(view) -> None:
    if hasattr(contentviews, "registry"):
        contentviews.registry.register(view)  # 12: replaces a view of the same name
        return
    existing = contentviews.get(view.name)
    if existing is not None:  # a reloaded script: the old instance is still registered
        contentviews.remove(existing)
    contentviews.add(view)


def _unregister(view) -> None:
    if hasattr(contentviews, "registry"):
        contentviews.registry._by_name.pop(view.name.lower(), None)  # 12 has no public remove
    elif view in contentviews.views:
        contentviews.remove(view)
