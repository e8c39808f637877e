"""mitmweb never runs with an unauthenticated API.

mitmproxy 11.0.x (the last line for Python 3.11) has no web authentication: any local
process could read every flow and run commands (`save.file @all <path>`) through mitmweb's
REST API (CVE-2025-23217, fixed in 11.1.2, which needs Python 3.12). On such versions this
addon puts a token check in front of every mitmweb route, websocket included, the way
11.1.2+ does it: `Authorization: Bearer <token>`, or `?token=<token>` once in the browser
(which then keeps a cookie). The token is `web_password` (the option 11.1.2+ has, so the
same command line works on every version), else a random one printed at start.
On versions with their own web authentication this addon does nothing.
"""

import hmac
import logging
import secrets
from urllib.parse import quote

from mitmproxy import ctx

logger = logging.getLogger(__name__)

COOKIE = "ccx_web_token"
PASSWORD_OPTION = "web_password"


def token_matches(presented: str | None, token: str) -> bool:
    """Constant-time comparison; an empty token never matches."""
    return bool(token and presented) and hmac.compare_digest(presented.encode(), token.encode())


def presented_token(authorization: str | None, query_token: str | None, cookie: str | None) -> list[str]:
    """Every token a request offers: a Bearer header, the `token` query argument, the cookie."""
    offered = []
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        offered.append(value.strip())
    offered += [t for t in (query_token, cookie) if t]
    return offered


def guard_routes(router, guard) -> int:
    """Replace every handler class reachable from a tornado router by `guard(cls)`.
    Returns how many were replaced."""
    import tornado.web

    count = 0
    for rule in getattr(router, "rules", ()):
        target = rule.target
        if isinstance(target, type) and issubclass(target, tornado.web.RequestHandler):
            rule.target = guard(target)
            count += 1
        else:
            count += guard_routes(target, guard)
    return count


class WebApiGuard:
    def __init__(self) -> None:
        self.token = ""
        self.generated = False
        self.protecting = False

    def load(self, loader) -> None:
        master = loader.master
        app = getattr(master, "app", None)
        if app is None or PASSWORD_OPTION in master.options:
            return  # mitmdump, or a mitmweb with its own authentication (11.1.2+)
        loader.add_option(
            PASSWORD_OPTION, str, "",
            "ccx-addon (mitmproxy without web authentication): the token mitmweb's web UI "
            "and API require (Authorization: Bearer TOKEN, or open /?token=TOKEN once). "
            "Empty: a random token, printed at start.",
        )
        # The web server starts after scripts load, so no request is served unguarded.
        # (default_router reaches every route: host rules and the wildcard router.)
        self.protecting = guard_routes(app.default_router, self.guarded) > 0

    def configure(self, updated) -> None:
        if self.protecting and PASSWORD_OPTION in updated:
            if ctx.options.web_password:
                self.token, self.generated = ctx.options.web_password, False
            elif not self.generated:
                self.token, self.generated = secrets.token_urlsafe(18), True

    def running(self) -> None:
        if self.protecting and self.generated:
            host = ctx.options.web_host or "127.0.0.1"
            logger.warning(
                f"mitmweb's API needs a token (this mitmproxy has no web authentication): "
                f"open http://{host}:{ctx.options.web_port}/?token={quote(self.token)}"
            )

    def allows(self, handler) -> bool:
        """Whether a tornado request carries the token (and, from `?token=`, keep it in a
        cookie so the browser app's later requests and websocket carry it too)."""
        query = handler.get_query_argument("token", None)
        offered = presented_token(handler.request.headers.get("Authorization"), query, handler.get_cookie(COOKIE))
        if not any(token_matches(t, self.token) for t in offered):
            return False
        if token_matches(query, self.token):
            handler.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict")
        return True

    def guarded(self, handler_class):
        auth = self

        class Guarded(handler_class):
            def prepare(self):
                if not auth.allows(self):
                    self.set_status(403)
                    self.set_header("Content-Type", "text/plain; charset=utf-8")
                    self.finish(
                        "403: mitmweb needs its token: open the URL with ?token=... that "
                        "ccx-addon printed at start, or send Authorization: Bearer TOKEN "
                        "(set a fixed one with --set web_password=...).\n"
                    )
                    return None
                return super().prepare()

        Guarded.__name__ = Guarded.__qualname__ = handler_class.__name__
        return Guarded
