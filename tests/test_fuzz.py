"""Malformed paths, headers and bodies thrown at a running gateway (hypothesis): it never
answers with a 5xx of its own making, never leaks a key, and never crashes.

The upstream is healthy and never answers 5xx itself, so any 5xx would be the gateway's (or
mitmproxy's, after an addon crash). Gateway-made answers carry `x-ccx-gateway: local`."""

import json
import logging

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatclient import CHAT
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from rawfuzz import exchange

SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
SECRETS = (PROXY_KEY, *UPSTREAM_KEYS)
KNOWN_PATHS = [CHAT, "/v1/models", "/v1/models/m", "/health", "/v1/chat/completions/", "/v1/responses",
               "/v1/v1/chat/completions", "/chat/completions", "/", "/v1/chat/completions?x=1"]

# --- strategies ---------------------------------------------------------------------------------

path_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="#"), max_size=60)
paths = st.one_of(
    st.sampled_from(KNOWN_PATHS),
    path_text.map(lambda p: "/" + p),
    st.builds(lambda base, extra: base + extra, st.sampled_from(KNOWN_PATHS), path_text),
)
header_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_"), min_size=1, max_size=20)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=80)
headers = st.dictionaries(header_names, header_values, max_size=5)
credentials = st.sampled_from([
    {"authorization": f"Bearer {PROXY_KEY}"}, {"x-api-key": PROXY_KEY}, {"authorization": f"bearer  {PROXY_KEY}"},
    {"authorization": f"Bearer {UPSTREAM_KEYS[0]}"}, {"authorization": "Basic Zm9vOmJhcg=="}, {},
])
content_types = st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Names a client may send: any text (surrogates, controls, CR LF), long, mapped ("gpt...").
model_names = st.one_of(
    st.text(min_size=1, max_size=40),
    st.builds(lambda a, b: a + "gpt" + b, st.text(max_size=10), st.text(max_size=10)),
    st.sampled_from(["m", "gpt-5", " ", "m\r\nx-evil: 1", "\u2603", "\ud800", "a" * 300]),
)


def chat_bodies(model, stream) -> st.SearchStrategy[bytes]:
    return st.fixed_dictionaries(
        {"model": model},
        optional={"stream": stream, "messages": json_values, "stream_options": json_values, "temperature": json_values},
    ).map(lambda d: json.dumps(d).encode())


# Bodies that pass the gateway's checks, in a few spellings.
valid_bodies = st.one_of(
    chat_bodies(model_names, st.booleans()),
    chat_bodies(model_names, st.booleans()).map(lambda b: b" \n" + b + b"\t"),
    st.builds(lambda m: json.dumps({"model": m, "messages": []}, ensure_ascii=False).encode("utf-8", "surrogatepass"), model_names),
)
any_bodies = st.one_of(
    valid_bodies,
    chat_bodies(st.one_of(model_names, json_values), st.one_of(st.booleans(), json_values)),
    valid_bodies.map(lambda b: b[: len(b) // 2]),  # cut short
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
methods = st.sampled_from(["POST", "POST", "POST", "GET", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"])


# --- checks ---------------------------------------------------------------------------------------


def check_answer(status: int, headers: dict[str, str], body: bytes, method: str) -> None:
    local = headers.get("x-ccx-gateway") == "local"
    from_upstream = "x-ccx-channel" in headers and not local
    assert status < 500, (status, headers, body[:300])
    if local and status >= 400 and method != "HEAD":
        error = json.loads(body)["error"]
        assert isinstance(error["message"], str) and error["message"]
    if not local and not from_upstream:
        # mitmproxy itself refused a malformed request: a 4xx, never a gateway crash page.
        assert 400 <= status < 500, (status, body[:300])
    text = body + json.dumps(headers).encode()
    for secret in SECRETS:
        assert secret.encode() not in text


def addon_errors(caplog) -> list[str]:
    return [r.getMessage()[:300] for r in caplog.records if r.levelno >= logging.ERROR]


def gateway_for_fuzzing(gateway, upstreams):
    up = upstreams()
    return gateway(config(
        channel("main", up.url + "/v1", extra='model_mapping: {gpt: up-model}'),
    )), up


# --- the tests ------------------------------------------------------------------------------------


class Sender:
    """Sends fuzzed requests with httpx and checks each answer."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.client = httpx.Client(timeout=15)
        self.seen = {"upstream": 0, "local": 0}

    def send(self, method: str, path: str, headers: dict, body: bytes) -> None:
        # Values as latin-1 bytes: httpx refuses non-ASCII text, mitmproxy must cope with it.
        raw_headers = {k: v.strip(" \t").encode("latin-1") if isinstance(v, str) else v for k, v in headers.items()
                       if k not in ("content-length", "transfer-encoding", "host", "connection", "expect")}
        url = httpx.URL(self.gw.url).copy_with(raw_path=path.encode())
        try:
            request = self.client.build_request(method, url, headers=raw_headers, content=body if method != "GET" else None)
        except (httpx.InvalidURL, UnicodeEncodeError):
            return  # not sendable by an HTTP client; the raw socket test covers such bytes
        response = self.client.send(request)
        check_answer(response.status_code, dict(response.headers), response.read(), method)
        self.seen["local" if response.headers.get("x-ccx-gateway") == "local" else "upstream"] += 1


def test_fuzzed_requests_through_an_http_client(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO)
    gw, up = gateway_for_fuzzing(gateway, upstreams)
    sender = Sender(gw)

    @settings(max_examples=100, **SETTINGS)
    @given(method=methods, path=paths, extra=headers, auth=credentials, body=any_bodies, content_type=content_types)
    def anything(method, path, extra, auth, body, content_type):
        sender.send(method, path, {**extra, **auth, "content-type": content_type}, body)

    # Requests that pass every check: the fuzzed model and headers travel upstream, into
    # response headers, the hand-over and the flow view.
    @settings(max_examples=80, **SETTINGS)
    @given(extra=headers, body=valid_bodies, content_type=content_types)
    def chat(extra, body, content_type):
        sender.send("POST", CHAT, {**extra, "authorization": f"Bearer {PROXY_KEY}", "content-type": content_type}, body)

    try:
        anything()
        chat()
    finally:
        sender.client.close()
    seen = sender.seen
    print(f"\nfuzz (http client): {sum(seen.values())} requests, {seen['upstream']} answered upstream, "
          f"{seen['local']} by the gateway, 0 server errors")
    assert seen["upstream"] >= 30 and seen["local"] >= 30  # both paths were exercised
    assert addon_errors(caplog) == []
    assert httpx.get(gw.url + "/health", timeout=5).status_code == 200


def raw_exchange(port: int, method: bytes, data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """Send bytes, read one HTTP response (None when the peer just closed)."""
    return exchange(port, data, timeout=10, method=method)


raw_bytes_in_line = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


def test_fuzzed_raw_requests(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO)
    gw, _ = gateway_for_fuzzing(gateway, upstreams)
    counts = {"answered": 0, "closed": 0}

    @settings(max_examples=60, **SETTINGS)
    @given(method=st.one_of(methods.map(str.encode), raw_bytes_in_line), path=st.one_of(paths.map(str.encode), raw_bytes_in_line.map(lambda b: b"/" + b)),
           header_lines=st.lists(st.tuples(raw_bytes_in_line, raw_bytes_in_line), max_size=4),
           auth=st.booleans(), body=any_bodies)
    def one(method, path, header_lines, auth, body):
        head = [method + b" " + path + b" HTTP/1.1", b"host: localhost", b"connection: close",
                b"content-length: %d" % len(body), b"content-type: application/json"]
        if auth:
            head.append(f"authorization: Bearer {PROXY_KEY}".encode())
        head += [name + b": " + value for name, value in header_lines
                 if name.strip().lower() not in (b"content-length", b"transfer-encoding", b"host", b"connection")]
        answer = raw_exchange(gw.port, method, b"\r\n".join(head) + b"\r\n\r\n" + body)
        if answer is None:
            counts["closed"] += 1
            return
        counts["answered"] += 1
        check_answer(*answer, method.decode("latin-1"))

    one()
    print(f"\nfuzz (raw bytes): {sum(counts.values())} requests, {counts['answered']} answered, "
          f"{counts['closed']} closed by mitmproxy, 0 server errors")
    assert counts["answered"] > 0
    assert addon_errors(caplog) == []
    assert httpx.get(gw.url + "/health", timeout=5).status_code == 200


# --- what fuzzing found, pinned down -------------------------------------------------------------


def test_found_head_answers_carry_no_body(gateway, upstreams):
    gw, _ = gateway_for_fuzzing(gateway, upstreams)
    with httpx.Client(base_url=gw.url, timeout=5) as client:  # one keep-alive connection
        for path in ("/health", CHAT, "/nowhere"):
            head = client.head(path, headers={"authorization": f"Bearer {PROXY_KEY}"})
            get = client.get(path, headers={"authorization": f"Bearer {PROXY_KEY}"})
            assert head.content == b"" and head.status_code == get.status_code
            assert int(head.headers["content-length"]) > 0 and get.content  # the length a GET gets
        assert client.get("/health").json()["status"] == "ok"  # the connection is still in step


def test_found_model_names_cannot_inject_headers_or_break_encoding(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO)
    gw, up = gateway_for_fuzzing(gateway, upstreams)
    for stream in (False, True):
        for model, shown in (("m\r\nx-evil: 1", "m%0D%0Ax-evil: 1"), ("\ud800 50%", "%ED%A0%80 50%25")):
            body = json.dumps({"model": model, "stream": stream, "messages": []}).encode()
            r = httpx.post(gw.url + CHAT, content=body, headers={"authorization": f"Bearer {PROXY_KEY}"}, timeout=5)
            assert r.status_code == 200 and "x-evil" not in r.headers
            assert r.headers["x-ccx-upstream-model"] == shown
            assert up.received[-1].json["model"] == model  # sent upstream exactly as asked
    assert addon_errors(caplog) == []


def test_found_undecodable_method_gets_a_gateway_answer(gateway, upstreams, caplog):
    caplog.set_level(logging.INFO)
    gw, _ = gateway_for_fuzzing(gateway, upstreams)
    status, headers, body = raw_exchange(gw.port, b"\x80", b"\x80 /v1/nowhere HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
    assert status == 404 and headers["x-ccx-gateway"] == "local"
    assert json.loads(body)["error"]["code"] == "unknown_url"
    assert addon_errors(caplog) == []
