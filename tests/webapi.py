"""mitmweb's REST API as its browser app uses it, for tests against a real `mitmweb -s`
subprocess. `web_api` is the one place the client is made (authentication lives here)."""

import time

import httpx
from mitmproxy.version import VERSION

from gateway_process import start_gateway
from harness import free_port

# mitmweb 11.1.2+ asks for a token; `web_password` sets it and the API takes it as a Bearer.
NEEDS_PASSWORD = int(VERSION.split(".")[0]) >= 12
WEB_PASSWORD = "web-ui-password-for-tests"


class WebApi:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def get(self, path: str, **params) -> httpx.Response:
        response = self.client.get(path, params=params or None)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        return response

    def post(self, path: str, **json) -> httpx.Response:
        return self.client.post(path, json=json or None)

    def flows(self) -> list[dict]:
        return self.get("/flows").json()

    def wait_until_up(self, timeout: float = 20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.client.get("/flows").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("mitmweb's web server did not come up")

    def wait_for_flows(self, predicate, count: int, timeout: float = 10) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            found = [f for f in self.flows() if predicate(f)]
            if len(found) >= count or time.time() > deadline:
                return found
            time.sleep(0.05)


def web_api(port: int) -> WebApi:
    """The REST client for a mitmweb on `port`: its authentication and XSRF cookie."""
    headers = {"authorization": f"Bearer {WEB_PASSWORD}"} if NEEDS_PASSWORD else {}
    # mitmweb's POST routes check tornado's XSRF token: cookie and header must agree.
    xsrf = "ccx-test-xsrf-token"
    cookies = {"_xsrf": xsrf, "_mitmproxy_xsrf": xsrf}
    return WebApi(httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={**headers, "x-xsrftoken": xsrf},
                               cookies=cookies, timeout=10))


def start_mitmweb(config_path, workdir, *args: str):
    """A `mitmweb -s ccx_addon/addon.py` gateway and its REST API, ready."""
    web_port = free_port()
    web_args = ["--set", "web_open_browser=false", "--set", f"web_port={web_port}", "--set", "web_host=127.0.0.1"]
    if NEEDS_PASSWORD:
        web_args += ["--set", f"web_password={WEB_PASSWORD}"]
    gw = start_gateway(config_path, workdir, *web_args, *args, tool="mitmweb")
    api = web_api(web_port)
    try:
        api.wait_until_up()
    except BaseException:
        gw.stop()
        raise
    gw.web_port = web_port
    return gw, api
