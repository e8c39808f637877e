"""The gateway with httpx instead of aiohttp as its upstream client, for the client
comparison only (`python bench/run.py --variant httpx=bench/gateway_httpx.py`).

An adapter gives httpx's streaming response the small part of aiohttp's interface the
gateway uses (status, reason, headers, content.read/readany, release, close).
"""

import asyncio
import logging
import os
import sys

import httpx

try:
    import ccx_addon
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ccx_addon
from ccx_addon.gateway import ChatGateway
from ccx_addon.upstream import UpstreamClient, UpstreamError


class _Content:
    def __init__(self, response: httpx.Response) -> None:
        self._chunks = response.aiter_raw()
        self._done = False

    async def readany(self) -> bytes:
        if self._done:
            return b""
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            self._done = True
            return b""
        except httpx.HTTPError as e:
            raise OSError(str(e)) from e

    async def read(self, n: int = -1) -> bytes:
        return await self.readany()


class _Response:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.headers = response.headers
        self.content = _Content(response)

    def release(self) -> None:
        if not self._response.is_closed:
            asyncio.ensure_future(self._response.aclose())

    close = release


class HttpxUpstreamClient(UpstreamClient):
    """The gateway's client with httpx underneath: `open` is replaced; reading bodies
    (`read_body`) is inherited, since the adapter's responses read like aiohttp's."""

    def __init__(self) -> None:
        super().__init__()
        self._client: httpx.AsyncClient | None = None

    def _ensure(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=100),
                trust_env=False, follow_redirects=False, timeout=None,
            )
        return self._client

    async def open(self, channel, headers, body, *args, **kwargs):
        # Extra arguments (a deadline) only matter for timeouts, which the benchmark never reaches.
        timeouts = channel.timeouts
        client = self._ensure()
        request = client.build_request("POST", channel.chat_url, headers=headers, content=body,
                                       timeout=httpx.Timeout(None, connect=timeouts.connect))
        try:
            async with asyncio.timeout(timeouts.response_headers):
                return _Response(await client.send(request, stream=True))
        except TimeoutError:
            raise UpstreamError("no response headers in time", timeout=True) from None
        except httpx.ConnectError as e:
            raise UpstreamError(f"cannot connect: {e}") from None
        except httpx.HTTPError as e:
            raise UpstreamError(f"connection failed: {type(e).__name__}: {e}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


# httpx logs every request at INFO; in mitmproxy each log line costs an addon event.
logging.getLogger("httpx").setLevel(logging.WARNING)

addons = ccx_addon.make_addons()
for addon in addons:
    if isinstance(addon, ChatGateway):
        addon.client = addon.forwarder.client = HttpxUpstreamClient()
