"""Talking to upstreams: the HTTP client, the headers sent, and what an answer means.

The addon sends upstream requests itself (instead of letting mitmproxy forward the flow)
because only then can a failed attempt be retried on another channel before any byte
reaches the client; see shared/notes/mitmproxy.md, "Failover: the limit".
"""

import asyncio
import email.utils
import functools
import os
import ssl
import time
from collections.abc import Iterable

import aiohttp

from .config import Channel
from .verdicts import Verdict, judge_answer  # noqa: F401 (re-exported)

# Never forwarded: connection-level headers, and the client's credentials.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
_NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key", "accept-encoding"}


def upstream_request_headers(
    client_headers: Iterable[tuple[str, str]], channel: Channel, key: str
) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in client_headers:
        lower = name.lower()
        if lower in _NOT_FORWARDED or lower.startswith("x-ccx-"):
            continue
        headers[name] = value
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
    """Upstream response headers minus those that describe the upstream connection."""
    dropped = HOP_BY_HOP | ({"content-length"} if streamed else set())
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


# What an answer means is decided in verdicts.py, from structured fields only; the old name
# stays for callers that still use it.
judge_status = judge_answer


class UpstreamError(Exception):
    """An attempt that produced no HTTP answer."""

    def __init__(self, reason: str, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout


class UpstreamClient:
    """One pooled aiohttp session on mitmproxy's event loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                # Upstreams are reached directly: an ambient HTTP(S)_PROXY must not
                # silently reroute requests that carry provider keys.
                trust_env=False,
            )
        return self._session

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
        session = self._ensure_session()
        try:
            async with asyncio.timeout(limit):
                return await session.post(
                    url or channel.chat_url,
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

    @staticmethod
    async def read_body(
        response: aiohttp.ClientResponse, timeout: float | None, limit: int,
        configured: float | None = None,
    ) -> bytes:
        """The whole body (up to `limit` bytes), or UpstreamError. `configured`: the limit
        to name when `timeout` is only what is left of it."""
        try:
            async with asyncio.timeout(timeout):
                body = bytearray()
                while chunk := await response.content.read(65536):
                    body += chunk
                    if len(body) > limit:
                        raise UpstreamError(f"response body larger than {limit} bytes")
                return bytes(body)
        except TimeoutError:
            stated = timeout if configured is None else configured
            raise UpstreamError(f"response body not complete within {stated:g}s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as e:
            raise UpstreamError(f"connection broke while reading the body: {type(e).__name__}") from None
        finally:
            response.release()

    async def get(
        self, url: str, headers: dict[str, str], timeout: float, limit: int, tls: "ssl.SSLContext | bool" = True,
    ) -> tuple[int, bytes]:
        """A small GET (an upstream's /models list): status and body, within `timeout`
        seconds and `limit` bytes, or UpstreamError. `tls`: the channel's `tls_for`."""
        session = self._ensure_session()
        try:
            async with asyncio.timeout(timeout):
                async with session.get(url, headers=headers, allow_redirects=False, ssl=tls) as response:
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

