"""Talking to upstreams: the HTTP client, the headers sent, and what an answer means.

The addon sends upstream requests itself (instead of letting mitmproxy forward the flow)
because only then can a failed attempt be retried on another channel before any byte
reaches the client; see shared/notes/mitmproxy.md, "Failover: the limit".
"""

import asyncio
import email.utils
import errno
import functools
import os
import ssl
import time
from collections.abc import Iterable

import aiohttp

from .config import Channel, Proxy
from .encodings import DecodeError, decode_body, unsupported_encoding
from .redact import scrub_text

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# The client headers that go upstream: an allowlist (README, "What goes upstream"). Anything
# else (cookies, the client's credentials, Content-Encoding of a body the gateway decoded,
# headers naming the client's own OpenAI organization) stays at the gateway.
FORWARDED_CLIENT_HEADERS = frozenset({
    "content-type", "accept", "user-agent", "x-session-id", "x-session-affinity",
})
# The OpenAI SDKs' client description (x-stainless-lang, -retry-count, ...).
FORWARDED_CLIENT_PREFIXES = ("x-stainless-",)


def forwarded_client_header(name: str) -> bool:
    lower = name.lower()
    return lower in FORWARDED_CLIENT_HEADERS or lower.startswith(FORWARDED_CLIENT_PREFIXES)


def upstream_request_headers(
    client_headers: Iterable[tuple[str, str]], channel: Channel, key: str
) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in client_headers:
        if forwarded_client_header(name):
            headers[name] = value
    if not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = "application/json"
    for name, value in channel.headers:
        headers[name] = value
    # SSE must stay readable event by event, and the flow view shows plain text.
    headers["Accept-Encoding"] = "identity"
    if channel.auth_header == "x-api-key":
        headers["x-api-key"] = key
    else:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def response_headers_for_client(headers: Iterable[tuple[str, str]], streamed: bool) -> list[tuple[str, str]]:
    """Upstream response headers minus those that describe the upstream connection, and
    minus Content-Encoding: the gateway decodes every body it passes on (encodings.py)."""
    dropped = HOP_BY_HOP | {"content-encoding"} | ({"content-length"} if streamed else set())
    return [(k, v) for k, v in headers if k.lower() not in dropped]


def parse_retry_after(headers: dict[str, str], now: float) -> float | None:
    """Seconds to wait, from `retry-after-ms` or `retry-after` (seconds or HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if value := lowered.get("retry-after-ms"):
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    if value := lowered.get("retry-after"):
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - now)
    return None


class UpstreamError(Exception):
    """An attempt that produced no HTTP answer."""

    def __init__(self, reason: str, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout


class BrokenBody(Exception):
    """The upstream broke the HTTP framing of its body (e.g. invalid chunked encoding)."""


# How long a silent body read waits before it checks whether the connection already failed.
_BROKEN_CHECK = 0.25


def body_failure(response: aiohttp.ClientResponse) -> str | None:
    """Why the body of `response` can no longer arrive, or None. aiohttp (3.14) records a
    framing error after the headers (invalid chunked encoding) on the connection but never
    wakes a pending body read: without this check the read waits for its timeout, and a
    stream's end reads as "upstream sent nothing"."""
    protocol = getattr(response, "_protocol", None)
    error = protocol.exception() if protocol is not None and hasattr(protocol, "exception") else None
    if error is None or response.content.is_eof():
        return None
    message = getattr(error, "message", "") or str(error) or type(error).__name__
    return " ".join(str(message).split("\n\n", 1)[0].split()).rstrip(":")[:120]


async def read_chunk(response: aiohttp.ClientResponse, timeout: float | None) -> bytes:
    """The next body bytes (b"" at the end), waiting at most `timeout` (TimeoutError), or
    BrokenBody as soon as the connection failed under a pending read."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        step = _BROKEN_CHECK if deadline is None else min(_BROKEN_CHECK, max(0.0, deadline - loop.time()))
        try:
            async with asyncio.timeout(step):
                return await response.content.readany()
        except TimeoutError:
            if problem := body_failure(response):
                raise BrokenBody(problem) from None
            if deadline is not None and loop.time() >= deadline:
                raise


def _new_session(connector: aiohttp.BaseConnector) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        # Proxies are decided per channel by the config (proxy_url, or the proxy
        # environment unless trust_env: false), never by aiohttp on its own.
        trust_env=False,
    )


class UpstreamClient:
    """One pooled aiohttp session on mitmproxy's event loop, plus one per SOCKS proxy
    (aiohttp speaks HTTP proxies itself; SOCKS needs aiohttp-socks' connector)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._socks_sessions: dict[str, aiohttp.ClientSession] = {}

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = _new_session(aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        return self._session

    def connection_for(self, proxy: Proxy | None) -> tuple[aiohttp.ClientSession, str | None]:
        """The session to send a channel's requests with and the `proxy=` argument for it.
        Every request of a channel (chat, models) goes through here."""
        if proxy is None or proxy.scheme in ("http", "https"):
            return self._ensure_session(), None if proxy is None else proxy.url
        session = self._socks_sessions.get(proxy.url)
        if session is None or session.closed:
            from aiohttp_socks import ProxyConnector, ProxyType  # only once a SOCKS proxy is used

            session = self._socks_sessions[proxy.url] = _new_session(ProxyConnector(
                host=proxy.host, port=proxy.port,
                proxy_type=ProxyType.SOCKS5, username=proxy.username or None,
                password=proxy.password or None, rdns=proxy.scheme == "socks5h", limit=0,
            ))
        return session, None

    async def post_via(
        self, channel: Channel, url: str, **kwargs
    ) -> aiohttp.ClientResponse:
        """`session.post` through the channel's proxy, if any. A proxy that cannot be
        reached or refuses the request is an UpstreamError that names the proxy (never its
        credentials), so a user can tell a proxy problem from a provider problem."""
        proxy = channel.proxy
        session, proxy_arg = self.connection_for(proxy)
        if proxy is None:
            return await session.post(url, **kwargs)
        try:
            response = await session.post(url, proxy=proxy_arg, **kwargs)
        except aiohttp.ClientHttpProxyError as e:  # CONNECT answered with an error
            raise UpstreamError(proxy_refusal(proxy, e.status)) from None
        except aiohttp.ClientProxyConnectionError as e:
            raise UpstreamError(proxy_unreachable(proxy, e.os_error)) from None
        except Exception as e:
            if (reason := socks_failure(proxy, e)) is None:
                raise
            raise UpstreamError(*reason) from None
        if response.status == 407:  # a plain-HTTP upstream: the proxy answers in its place
            response.release()
            raise UpstreamError(proxy_refusal(proxy, 407))
        return response

    async def open(
        self, channel: Channel, headers: dict[str, str], body: bytes,
        deadline: float | None = None, url: str = "",
    ) -> aiohttp.ClientResponse:
        """Send the request; return once response headers arrived. A streaming request
        waits up to `response_headers` for the stream to start; a non-streaming one (whose
        headers only come when the whole answer is ready) is bounded by `deadline`, the
        monotonic time its `total` limit ends."""
        timeouts = channel.timeouts
        if deadline is not None:
            limit = max(0.0, deadline - time.monotonic())
            expired = f"no response headers within {timeouts.total:g}s (timeouts.total)"
        else:
            limit = timeouts.response_headers
            expired = f"no response headers within {limit:g}s" if limit is not None else ""
        response = await self._post(channel, url or channel.chat_url, headers, body, limit, expired)
        if problem := unsupported_encoding(response.headers.get("content-encoding")):
            response.close()
            raise UpstreamError(problem)
        return response

    async def _post(self, channel: Channel, url: str, headers, body: bytes, limit, expired: str) -> aiohttp.ClientResponse:
        timeouts = channel.timeouts
        try:
            async with asyncio.timeout(limit):
                return await self.post_via(
                    channel,
                    url,
                    ssl=tls_for(channel),
                    data=body,
                    headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=timeouts.connect, sock_read=None
                    ),
                )
        # aiohttp's connect timeout is a TimeoutError too: it must be caught first.
        except aiohttp.ServerTimeoutError:
            raise UpstreamError(f"connect timeout after {timeouts.connect:g}s", timeout=True) from None
        except TimeoutError:
            raise UpstreamError(expired, timeout=True) from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise UpstreamError(certificate_problem(channel, e)) from None
        except aiohttp.ClientConnectorError as e:
            raise UpstreamError(f"cannot connect: {_os_reason(e)}") from None
        except aiohttp.ServerDisconnectedError:
            raise UpstreamError("connection closed before response headers") from None
        except aiohttp.ClientResponseError as e:
            # Not HTTP. Only the parser's complaint: str(e) and e.request_info carry more.
            complaint = " ".join(e.message.split("\n\n", 1)[0].split())[:120]
            raise UpstreamError(f"invalid HTTP response: {complaint}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(f"connection failed: {type(e).__name__}: {e}".rstrip(": ")) from None
        except ValueError as e:
            # aiohttp refuses e.g. credentials in base_url next to an Authorization header.
            raise UpstreamError(f"cannot send the request: {e}") from None

    @staticmethod
    async def read_body(
        response: aiohttp.ClientResponse, timeout: float | None, limit: int,
        configured: float | None = None,
    ) -> bytes:
        """The whole body (up to `limit` bytes), decoded from its content encoding, or
        UpstreamError. `configured`: the limit to name when `timeout` is only what is left
        of it."""
        try:
            async with asyncio.timeout(timeout):
                body = bytearray()
                while chunk := await read_chunk(response, None):
                    body += chunk
                    if len(body) > limit:
                        raise UpstreamError(f"response body larger than {limit} bytes")
            return decode_body(bytes(body), response.headers.get("content-encoding"), limit)
        except DecodeError as e:
            raise UpstreamError(str(e)) from None
        except BrokenBody as e:
            raise UpstreamError(f"upstream broke off the body: {e}") from None
        except TimeoutError:
            stated = timeout if configured is None else configured
            raise UpstreamError(f"response body not complete within {stated:g}s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(f"connection broke while reading the body: {type(e).__name__}") from None
        finally:
            response.release()

    async def get(
        self, channel: Channel, url: str, headers: dict[str, str], timeout: float, limit: int,
    ) -> tuple[int, bytes]:
        """A small GET (an upstream's /models list) through the channel's proxy, if any, with
        its TLS settings: status and body, within `timeout` seconds and `limit` bytes, or
        UpstreamError."""
        session, proxy_arg = self.connection_for(channel.proxy)
        try:
            async with asyncio.timeout(timeout):
                async with session.get(url, headers=headers, allow_redirects=False, proxy=proxy_arg,
                                       ssl=tls_for(channel)) as response:
                    body = await response.content.read(limit + 1)
                    if len(body) > limit:
                        raise UpstreamError(f"response body larger than {limit} bytes")
                    return response.status, body
        except TimeoutError:
            raise UpstreamError(f"no answer within {timeout:g}s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(f"connection failed: {type(e).__name__}") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        for session in self._socks_sessions.values():
            await session.close()
        self._socks_sessions.clear()


# --- proxy failures --------------------------------------------------------------------------


def proxy_refusal(proxy: Proxy, status: int) -> str:
    if status == 407:
        return (f"proxy {proxy.address} answered 407: proxy authentication required "
                f"(check the user and password in the channel's proxy URL)")
    return f"proxy {proxy.address} answered {status}"


def proxy_unreachable(proxy: Proxy, error: BaseException | None) -> str:
    code = getattr(error, "errno", None)
    if code == errno.ECONNREFUSED:
        return f"proxy {proxy.address} refused the connection"
    text = (os.strerror(code) if code else None) or scrub_text(str(error or ""), proxy.secrets)
    return f"proxy {proxy.address} unreachable: {text or 'connection failed'}"


def socks_failure(proxy: Proxy, error: Exception) -> tuple[str, bool] | None:
    """(reason, timeout) for an error of aiohttp-socks or python-socks, else None."""
    module = type(error).__module__ or ""
    if not module.startswith(("aiohttp_socks", "python_socks")):
        return None
    message = scrub_text(str(error), proxy.secrets)
    name = type(error).__name__
    if name == "ProxyTimeoutError":
        return f"proxy {proxy.address} did not answer in time", True
    if name == "ProxyConnectionError":
        # aiohttp-socks re-raises python-socks' error, an OSError with the errno.
        cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
        return proxy_unreachable(proxy, cause if isinstance(cause, OSError) else None), False
    return f"proxy {proxy.address}: {message}", False


def tls_for(channel: Channel) -> "ssl.SSLContext | bool":
    """How the channel's HTTPS upstreams are verified: aiohttp's default (True), not at
    all (`tls_verify: false`), or against the channel's own CA file (`ca_file`)."""
    if not channel.tls_verify:
        return False
    if channel.ca_file:
        return _ca_context(channel.ca_file)
    return True


@functools.lru_cache(maxsize=32)
def _ca_context(ca_file: str) -> ssl.SSLContext:
    # One context per file: aiohttp pools connections per context, and loading is slow.
    return ssl.create_default_context(cafile=ca_file)


def certificate_problem(channel: Channel, error: aiohttp.ClientConnectorCertificateError) -> str:
    """An attempt outcome for a certificate the gateway cannot verify, saying how to fix it."""
    cert_error = error.certificate_error
    why = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None) or type(cert_error).__name__
    fix = (
        f"this channel's ca_file ({channel.ca_file}) does not vouch for it" if channel.ca_file else
        "if the upstream uses a self-signed or private-CA certificate, set ca_file: /path/to/ca.pem "
        "on the channel (or tls_verify: false, which skips verification)"
    )
    return f"TLS certificate problem ({why}) at {error.host}:{error.port}: {fix}"


def _os_reason(error: aiohttp.ClientConnectorError) -> str:
    os_error = error.os_error
    # asyncio's strerror is "Connect call failed ('127.0.0.1', 9)": say "Connection refused".
    code = getattr(os_error, "errno", None)
    text = (os.strerror(code) if code else None) or str(os_error) or type(os_error).__name__
    return f"{text} ({error.host}:{error.port})"

