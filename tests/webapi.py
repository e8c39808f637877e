"""An authenticated client for a mitmweb subprocess's REST API, as its browser app uses it,
on every mitmproxy version.

mitmweb 11.1.2+ asks for a token itself (`web_password`); on 11.0.x the addon's webauth.py
adds the same option and check. Either way `--set web_password=...` fixes the token and
the API takes it as `Authorization: Bearer ...`, so tests drive both versions alike.
"""

import time

import httpx

from gateway_process import start_gateway
from harness import free_port

WEB_PASSWORD = "web-ui-password-for-tests"
# mitmweb's POST routes check tornado's XSRF token: cookie and header must agree.
_XSRF = "ccx-test-xsrf-token"


class WebApi:
    def __init__(self, port: int, token: str | None = WEB_PASSWORD) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        headers = {"x-xsrftoken": _XSRF}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.client = httpx.Client(base_url=self.base_url, headers=headers,
                                   cookies={"_xsrf": _XSRF, "_mitmproxy_xsrf": _XSRF}, timeout=10)

    def get(self, path: str, **params) -> httpx.Response:
        response = self.client.get(path, params=params or None)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        return response

    def post(self, path: str, **json) -> httpx.Response:
        return self.client.post(path, json=json or None)

    def flows(self) -> list[dict]:
        return self.get("/flows").json()

    def wait_until_up(self, timeout: float = 20) -> None:
        """Until the web server answers (with or without this client's token)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                self.client.get("/flows")
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError("mitmweb's web server did not come up")

    def wait_for_flows(self, predicate, count: int, timeout: float = 10) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            found = [f for f in self.flows() if predicate(f)]
            if len(found) >= count or time.time() > deadline:
                return found
            time.sleep(0.05)

    def close(self) -> None:
        self.client.close()


def mitmweb_args(web_port: int) -> list[str]:
    return ["--set", "web_open_browser=false", "--set", f"web_port={web_port}",
            "--set", "web_host=127.0.0.1", "--set", f"web_password={WEB_PASSWORD}"]


def start_mitmweb(config_path, workdir, *args: str, env=None):
    """A `mitmweb -s ccx_addon/addon.py` subprocess and a WebApi client with its token.
    The caller stops both (`gw.stop()`, `api.close()`)."""
    web_port = free_port()
    gw = start_gateway(config_path, workdir, *mitmweb_args(web_port), *args, tool="mitmweb", env=env)
    api = WebApi(web_port)
    try:
        api.wait_until_up()
    except BaseException:
        gw.stop()
        api.close()
        raise
    gw.web_port = web_port
    return gw, api
