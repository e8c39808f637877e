"""Upstream proxies: a channel's `proxy_url` (HTTP, SOCKS5) and the proxy environment, through
real proxies the tests start on 127.0.0.1: mitmdump in regular mode (optionally with
`proxyauth`) and in socks5 mode. Each proxy's own log shows what passed through it.
"""

import asyncio
import base64
import os
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from ccx_addon.config import ConfigError, Proxy, check_proxy_url, parse_config, resolve_proxy
from ccx_addon.explain import explain_model, format_config_summary, format_explanation
from chatclient import AUTH, ask, chat_flows, error_of, events, health, streamed_text
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import FakeUpstream
from gateway_process import start_gateway
from harness import BIN, SubprocessGateway, free_port

USER, PASSWORD = "ccxuser", "Pr0xy-s3cret-9d4e"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class MitmProxy:
    """`mitmdump --mode regular|socks5@127.0.0.1:PORT` as the proxy under test."""

    def __init__(self, workdir, mode: str = "regular", *args: str) -> None:
        self.port = free_port()
        self.log_path = workdir / f"proxy-{mode}-{self.port}.log"
        self.process = subprocess.Popen(
            [str(BIN / "mitmdump"), "--mode", f"{mode}@127.0.0.1:{self.port}",
             "--set", "flow_detail=1", "--set", f"confdir={workdir / 'proxy-conf'}", *args],
            stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            assert self.process.poll() is None, self.log()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(self.log())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def passed(self, upstream) -> int:
        """How many requests to `upstream` this proxy forwarded (from its flow lines)."""
        return self.log().count(f"127.0.0.1:{upstream.port}/v1/chat/completions")

    stop = SubprocessGateway.stop


@pytest.fixture
def proxies(tmp_path):
    started = []

    def start(mode: str = "regular", *args: str) -> MitmProxy:
        proxy = MitmProxy(tmp_path, mode, *args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def dead_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


def chat_ok(gw, stream: bool = False) -> httpx.Response:
    response = ask(gw, stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        assert streamed_text(events(response.text)) == "hello from upstream"
    return response


# --- through real proxies ---------------------------------------------------------------------


def test_chat_and_streaming_through_an_http_proxy(gateway, upstreams, proxies):
    up, proxy = upstreams(), proxies()
    gw = gateway(config(channel("viaproxy", up.url + "/v1", extra=f"proxy_url: http://127.0.0.1:{proxy.port}")))
    chat_ok(gw)
    chat_ok(gw, stream=True)
    assert up.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEYS[0]}"
    assert proxy.passed(up) == 2, proxy.log()
    comments = [f.comment for f in chat_flows(gw, 2)]
    assert all(c.endswith(f"| proxy http://127.0.0.1:{proxy.port}") for c in comments), comments


def test_an_authenticated_proxy_and_a_wrong_password(gateway, upstreams, proxies, monkeypatch):
    up, proxy = upstreams(), proxies("regular", "--set", f"proxyauth={USER}:{PASSWORD}")
    monkeypatch.setenv("CCX_TEST_PROXY_PASSWORD", PASSWORD)
    good = f"proxy_url: http://{USER}:${{CCX_TEST_PROXY_PASSWORD}}@127.0.0.1:{proxy.port}"
    wrong = f"proxy_url: http://{USER}:not-the-password@127.0.0.1:{proxy.port}"
    gw = gateway(config(channel("good", up.url + "/v1", extra=good)))
    chat_ok(gw)
    chat_ok(gw, stream=True)
    assert proxy.passed(up) == 2
    assert f"proxy http://{USER}:***@127.0.0.1:{proxy.port}" in chat_flows(gw, 2)[0].comment

    # The wrong password alone: a clear error that names the proxy, not the provider.
    alone = gateway(config(channel("wrong", up.url + "/v1", extra=wrong)))
    response = ask(alone)
    assert response.status_code == 502
    message = error_of(response)["message"]
    assert f"wrong (wrong#1): proxy 127.0.0.1:{proxy.port} answered 407: proxy authentication required" in message
    assert "not-the-password" not in response.text
    # ... and with a direct channel behind it: failover.
    both = gateway(config(channel("wrong", up.url + "/v1", extra=wrong), channel("direct", up.url + "/v1")))
    for stream in (False, True):
        response = chat_ok(both, stream)
        assert response.headers["x-ccx-channel"] == "direct" and response.headers["x-ccx-attempts"] == "2"
    flow = chat_flows(both, 2)[0]
    assert flow.metadata["ccx"]["attempts"][0]["outcome"].startswith(f"proxy 127.0.0.1:{proxy.port} answered 407")
    assert "failover after wrong (wrong#1): proxy" in flow.comment


def test_socks5_and_socks5h(gateway, upstreams, proxies):
    up, socks = upstreams(), proxies("socks5")
    gw = gateway(config(
        channel("socks", up.url + "/v1", extra=f"proxy_url: socks5://127.0.0.1:{socks.port}"),
        channel("socksh", up.url + "/v1", extra=f"proxy_url: socks5h://127.0.0.1:{socks.port}\npriority: 9"),
    ))
    chat_ok(gw)
    chat_ok(gw, stream=True)
    assert socks.passed(up) == 2, socks.log()
    assert "| proxy socks5://127.0.0.1:" in chat_flows(gw, 2)[0].comment
    only_h = gateway(config(channel("socksh", up.url + "/v1", extra=f"proxy_url: socks5h://127.0.0.1:{socks.port}")))
    chat_ok(only_h, stream=True)
    assert socks.passed(up) == 3


@pytest.mark.parametrize("scheme", ["http", "socks5"])
def test_a_dead_proxy_fails_over_to_a_direct_channel(gateway, upstreams, scheme):
    up = upstreams()
    port = dead_port()
    gw = gateway(config(
        channel("proxied", up.url + "/v1", extra=f"proxy_url: {scheme}://127.0.0.1:{port}"),
        channel("direct", up.url + "/v1"),
        top="circuit_breaker: {consecutive_failures: 2}\n",
    ))
    for stream in (False, True):
        response = chat_ok(gw, stream)
        assert response.headers["x-ccx-channel"] == "direct"
    flow = chat_flows(gw, 1)[0]
    assert flow.metadata["ccx"]["attempts"][0]["outcome"] == f"proxy 127.0.0.1:{port} refused the connection"
    assert f"failover after proxied (proxied#1): proxy 127.0.0.1:{port} refused" in flow.comment
    assert len(up.received) == 2
    # Two connection failures open the channel's circuit, as for a dead upstream.
    assert health(gw)["proxied"]["circuit"] == "open"
    assert chat_ok(gw).headers["x-ccx-attempts"] == "1"


def test_the_proxy_environment_no_proxy_and_trust_env(upstreams, proxies, write_config, tmp_path):
    """Real mitmdump gateways started with the environment (the test's own HTTP client
    must not see it)."""
    up, proxy = upstreams(), proxies()
    live, dead = f"http://127.0.0.1:{proxy.port}", f"http://127.0.0.1:{dead_port()}"

    def serve(env: dict, text: str = config(channel("env", up.url + "/v1")), stream: bool = False) -> httpx.Response:
        gw = start_gateway(write_config(text, f"env-{len(env)}-{time.monotonic_ns()}.yaml"), tmp_path, env=env)
        try:
            return ask(gw, stream=stream)
        finally:
            gw.stop()

    assert serve({"HTTP_PROXY": live}).status_code == 200
    assert proxy.passed(up) == 1
    assert serve({"ALL_PROXY": f"127.0.0.1:{proxy.port}"}, stream=True).status_code == 200  # no scheme: http
    assert proxy.passed(up) == 2

    both_dead = {"HTTP_PROXY": dead, "ALL_PROXY": dead}
    response = serve(both_dead)
    assert response.status_code == 502
    assert f"env (env#1): proxy {dead.removeprefix('http://')} refused the connection" in error_of(response)["message"]
    assert serve({**both_dead, "NO_PROXY": "localhost,127.0.0.1"}).status_code == 200
    assert serve({**both_dead, "no_proxy": "*"}).status_code == 200
    assert serve(both_dead, config(channel("env", up.url + "/v1"), top="trust_env: false\n")).status_code == 200
    assert serve(both_dead, config(channel("env", up.url + "/v1", extra="proxy_url: direct"))).status_code == 200
    assert proxy.passed(up) == 2  # none of the last four went through a proxy
    assert len(up.received) == 6


# --- secrets ----------------------------------------------------------------------------------


def test_the_proxy_password_appears_in_no_output(upstreams, proxies, write_config, tmp_path):
    """A real mitmdump at flow_detail 4 writing flows with -w; an authenticated proxy that
    works, the same proxy with the password wrong, streams and errors."""
    up, proxy = upstreams(), proxies("regular", "--set", f"proxyauth={USER}:{PASSWORD}")
    flows_file = tmp_path / "flows.mitm"
    good = f"proxy_url: http://{USER}:${{CCX_TEST_PROXY_PASSWORD}}@127.0.0.1:{proxy.port}"
    wrong = f"proxy_url: http://{USER}:{PASSWORD}-old@127.0.0.1:{proxy.port}"
    cfg = write_config(config(
        channel("wrong", up.url + "/v1", extra=wrong),
        channel("good", up.url + "/v1", extra=good, keys=UPSTREAM_KEYS[1:2]),
    ))
    env = {"CCX_TEST_PROXY_PASSWORD": PASSWORD}
    gw = start_gateway(cfg, tmp_path, "--set", "flow_detail=4", "-w", str(flows_file), env=env)
    answers = []
    try:
        for stream in (False, True, False):
            response = ask(gw, stream=stream)
            assert response.status_code == 200 and response.headers["x-ccx-channel"] == "good"
            answers.append(response)
        answers.append(httpx.get(gw.url + "/health"))
        answers.append(httpx.get(gw.url + "/v1/models", headers=AUTH))
        answers.append(ask(gw, headers={}))  # rejected
    finally:
        gw.stop()
    cli_env = {**os.environ, **env, "PROXY_ACCESS_KEY": PROXY_KEY}
    cli = [subprocess.run([str(BIN / "ccx-addon"), *args, "--config", str(cfg)], capture_output=True,
                          text=True, env=cli_env, timeout=60) for args in (["check"], ["explain", "m"])]
    assert all(c.returncode == 0 for c in cli), [c.stderr for c in cli]
    assert f"via proxy http://{USER}:***@127.0.0.1:{proxy.port} (proxy_url)" in cli[1].stdout

    outputs = {
        "client answers": "\n".join(f"{r.headers}\n{r.text}" for r in answers),
        "console": gw.log(),
        "saved flows": flows_file.read_bytes().decode("latin-1"),
        "check": cli[0].stdout + cli[0].stderr,
        "explain": cli[1].stdout + cli[1].stderr,
    }
    assert "answered 407" in outputs["saved flows"]  # the failed attempt is recorded...
    assert f"{USER}:***@" in outputs["console"]  # ...and the proxy shown, masked
    for name, text in outputs.items():
        for secret in (PASSWORD, BASIC, f"{PASSWORD}-old"):
            assert secret not in text, f"{secret!r} in {name}"


# --- decisions: validation and resolution -----------------------------------------------------


def parse(text: str, environ=None):
    return parse_config(f'proxy_access_keys: ["{PROXY_KEY}"]\n' + text, "ccx.yaml", environ=environ or {})


def one_channel(extra: str = "", url: str = "https://api.example.com/v1") -> str:
    return f"channels:\n  - name: main\n    base_url: {url}\n    api_keys: [k]\n" + (f"    {extra}\n" if extra else "")


@pytest.mark.parametrize("value, problem", [
    ("ftp://127.0.0.1:21", "must start with http://, https://, socks5:// or socks5h:// (or be direct)"),
    ("127.0.0.1:8888", "must start with http://"),
    ("http://127.0.0.1", "has no port (write scheme://host:port)"),
    ("socks5://:1080", "has no host"),
    ("http://127.0.0.1:99999", "has an invalid port"),
    ("http://127.0.0.1:8888/path", "without a path"),
])
def test_bad_proxy_urls_are_refused_at_start_up(value, problem):
    with pytest.raises(ConfigError) as e:
        parse(one_channel(f'proxy_url: "{value}"'))
    assert str(e.value).startswith("ccx.yaml, line 6, channels[0].proxy_url: ") and problem in str(e.value)


def test_a_bad_proxy_url_with_credentials_is_not_quoted_back():
    with pytest.raises(ConfigError) as e:
        parse(one_channel(f'proxy_url: "gopher://{USER}:{PASSWORD}@h:1"'))
    assert PASSWORD not in str(e.value) and USER not in str(e.value)
    with pytest.raises(ConfigError) as e:
        parse(one_channel('proxy_url: "http://u:${MISSING_PROXY_PASSWORD}@h:1"'))
    assert "environment variable MISSING_PROXY_PASSWORD is not set" in str(e.value)


def test_proxy_url_forms_and_secrets():
    cfg = parse(one_channel(f'proxy_url: "http://{USER}:${{P}}@127.0.0.1:8888"'), {"P": "p@ss word"})
    proxy = cfg.channels[0].proxy
    assert proxy.display == f"http://{USER}:***@127.0.0.1:8888" and proxy.address == "127.0.0.1:8888"
    assert {"p@ss word", base64.b64encode(f"{USER}:p@ss word".encode()).decode()} <= set(cfg.secrets)
    assert PASSWORD not in repr(cfg) and "p@ss" not in repr(cfg.channels[0])
    token = Proxy("socks5h://tok3n-only@[::1]:1080")
    assert token.display == "socks5h://***@[::1]:1080" and token.secrets == ("tok3n-only",)
    assert parse(one_channel("proxy_url: direct")).channels[0].proxy is None
    assert parse(one_channel('proxy_url: "${UNSET_PROXY:-}"')).channels[0].proxy is None
    with pytest.raises(ConfigError, match="the echo: channel takes no proxy"):
        parse('channels:\n  - name: e\n    base_url: "echo:"\n    proxy_url: http://h:1\n')


ENV = {"HTTPS_PROXY": "http://127.0.0.1:8888", "http_proxy": "socks5://127.0.0.1:1080",
       "ALL_PROXY": "socks5h://127.0.0.1:1081", "NO_PROXY": "localhost, .internal.example"}


@pytest.mark.parametrize("base_url, proxy_url, environ, expected", [
    ("https://api.openai.com/v1", None, ENV, ("http://127.0.0.1:8888", "HTTPS_PROXY")),
    ("http://10.0.0.1:8000/v1", None, ENV, ("socks5://127.0.0.1:1080", "http_proxy")),
    ("https://api.openai.com/v1", None, {"ALL_PROXY": "socks5h://127.0.0.1:1081"}, ("socks5h://127.0.0.1:1081", "ALL_PROXY")),
    ("https://api.internal.example/v1", None, ENV, "NO_PROXY matches api.internal.example"),
    ("http://localhost:8000/v1", None, ENV, "NO_PROXY matches localhost"),
    ("https://api.openai.com/v1", None, {**ENV, "no_proxy": "*"}, "no_proxy matches api.openai.com"),
    ("https://api.openai.com/v1", None, None, "trust_env: false"),
    ("https://api.openai.com/v1", "direct", ENV, "proxy_url: direct"),
    ("https://api.openai.com/v1", "socks5://127.0.0.1:9", ENV, ("socks5://127.0.0.1:9", "proxy_url")),
    ("https://api.openai.com/v1", None, {}, ""),
])
def test_which_proxy_a_channel_uses(base_url, proxy_url, environ, expected):
    proxy, because = resolve_proxy(base_url, proxy_url, environ)
    if isinstance(expected, tuple):
        assert (proxy.url, proxy.source, because) == (*expected, "")
    else:
        assert (proxy, because) == (None, expected)


def test_a_broken_proxy_environment_variable_is_named():
    with pytest.raises(ConfigError) as e:
        parse(one_channel(), {"HTTPS_PROXY": f"http://{USER}:{PASSWORD}@proxy.example"})
    assert "environment variable HTTPS_PROXY (the proxy for api.example.com) has no port" in str(e.value)
    assert "trust_env: false" in str(e.value) and PASSWORD not in str(e.value)
    assert parse("trust_env: false\n" + one_channel(), {"HTTPS_PROXY": "http://proxy.example"}).trust_env is False


def test_explain_and_check_say_which_proxy_each_channel_uses():
    cfg = parse(
        "channels:\n"
        f"  - name: a\n    base_url: https://a.example/v1\n    api_keys: [k]\n    proxy_url: http://{USER}:{PASSWORD}@127.0.0.1:8888\n"
        "  - name: b\n    base_url: https://b.example/v1\n    api_keys: [k]\n"
        "  - name: c\n    base_url: https://c.example/v1\n    api_keys: [k]\n    proxy_url: direct\n",
        {"HTTPS_PROXY": "socks5h://127.0.0.1:1080"},
    )
    text = format_explanation(explain_model(cfg, "m"))
    assert f"via proxy http://{USER}:***@127.0.0.1:8888 (proxy_url)" in text
    assert "via proxy socks5h://127.0.0.1:1080 (from HTTPS_PROXY)" in text
    assert "direct (proxy_url: direct)" in text
    summary = format_config_summary(cfg)
    assert "via proxy socks5h://127.0.0.1:1080 (from HTTPS_PROXY)" in summary
    assert PASSWORD not in text + summary
    assert check_proxy_url("https://proxy.example:443") is None


# --- an HTTPS upstream, tunnelled with CONNECT ------------------------------------------------


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 (IP SAN) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ccx test upstream")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "upstream-cert.pem", tmp_path / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsUpstream(FakeUpstream):
    """The fake upstream behind TLS (https://127.0.0.1:PORT)."""

    def __init__(self, cert_path, key_path) -> None:
        super().__init__()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert_path, key_path)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]


def test_an_https_upstream_is_tunnelled_through_the_proxy_with_connect(proxies, write_config, tmp_path):
    cert_path, key_path = self_signed(tmp_path)
    up = TlsUpstream(cert_path, key_path).start()
    # The proxy passes the tunnel through untouched (no TLS interception), after checking
    # the password on CONNECT.
    proxy = proxies("regular", "--set", f"proxyauth={USER}:{PASSWORD}", "--set", "ignore_hosts=.*",
                    "--set", "termlog_verbosity=debug")
    cfg = write_config(config(channel(
        "tls", up.url + "/v1", extra=f"proxy_url: http://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}")))
    # The gateway trusts the test certificate, and nothing else (loopback only anyway).
    gw = start_gateway(cfg, tmp_path, env={"SSL_CERT_FILE": str(cert_path)})
    try:
        chat_ok(gw)
        chat_ok(gw, stream=True)
        assert len(up.received) == 2 and up.received[0].headers["authorization"] == f"Bearer {UPSTREAM_KEYS[0]}"
        assert f"127.0.0.1:{up.port}" in proxy.log()  # the proxy made the connection
    finally:
        gw.stop()
        up.stop()


def test_an_authenticated_socks5_proxy(gateway, upstreams, proxies):
    up, socks = upstreams(), proxies("socks5", "--set", f"proxyauth={USER}:{PASSWORD}")
    gw = gateway(config(
        channel("wrong", up.url + "/v1", extra=f"proxy_url: socks5://{USER}:wrong-pw@127.0.0.1:{socks.port}"),
        channel("good", up.url + "/v1", extra=f"proxy_url: socks5h://{USER}:{PASSWORD}@127.0.0.1:{socks.port}"),
    ))
    response = chat_ok(gw, stream=True)
    assert response.headers["x-ccx-channel"] == "good" and socks.passed(up) == 1
    outcome = chat_flows(gw, 1)[0].metadata["ccx"]["attempts"][0]["outcome"]
    assert outcome == f"proxy 127.0.0.1:{socks.port}: Username and password authentication failure", outcome
