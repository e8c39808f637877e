"""A raw-socket fuzzer for a running gateway (`mitmdump -s ccx_addon/addon.py`): requests an
HTTP client would not send (bare CR or NUL in headers, request content encodings, integers
of thousands of digits, lone surrogates, duplicate keys, thousands of headers, oversized and
unauthenticated bodies, broken framing). Shared by tests/test_hardening.py (a few hundred
cases in CI) and bench/fuzz.py (10,000 cases, with figures).

What must hold for every case: the answer, if any, is the gateway's OpenAI-shaped JSON (or
the healthy fake upstream's answer, routed), never a 5xx, never mitmproxy's HTML page; the
reverse target receives nothing; the gateway's log has no traceback.
"""

import collections
import gzip
import json
import random
import socket
import zlib

import h11

PROXY_KEY = "pk-fuzz-proxy-key-81c2"
UPSTREAM_KEY = "sk-fuzz-upstream-key-77d1"
CHAT = b"/v1/chat/completions"
# The fuzzed gateway runs with small limits, so oversized cases stay cheap.
FUZZ_OPTIONS = ("--set", "ccx_max_body_size=256k")
BODY_LIMIT = 256 * 1024
LOG_PROBLEMS = ("Traceback", "Addon error", "Unhandled error", "Logging error")


def gateway_config(upstream_url: str) -> str:
    return (f'proxy_access_keys: ["{PROXY_KEY}"]\nchannels:\n  - name: main\n    base_url: {upstream_url}/v1\n'
            f'    api_keys: ["{UPSTREAM_KEY}"]\n    model_mapping: {{gpt: up-model}}\n')


# --- cases ---------------------------------------------------------------------------------------


def chat_body(rng: random.Random, model=None, extra: bytes = b"") -> bytes:
    model = model if model is not None else rng.choice([b'"m"', b'"gpt-5"', b'"\\ud800"', b'"a\\udfff b"', b'"\xe2\x98\x83"'])
    stream = rng.choice([b"true", b"false"])
    return b'{"model": ' + model + b', "stream": ' + stream + b', "messages": [{"role": "user", "content": "hi"}]' + extra + b"}"


def head(method: bytes = b"POST", path: bytes = CHAT, headers=(), auth: bool = True, version: bytes = b"HTTP/1.1") -> list[bytes]:
    lines = [method + b" " + path + b" " + version, b"host: localhost", b"connection: close"]
    if auth:
        lines.append(b"authorization: Bearer " + PROXY_KEY.encode())
    return lines + list(headers)


def with_length(lines: list[bytes], body: bytes) -> bytes:
    return b"\r\n".join(lines + [b"content-length: %d" % len(body)]) + b"\r\n\r\n" + body


def chunked(lines: list[bytes], body: bytes, size: int = 65536) -> bytes:
    parts = [b"%x\r\n%b\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"\r\n".join(lines + [b"transfer-encoding: chunked"]) + b"\r\n\r\n" + b"".join(parts) + b"0\r\n\r\n"


def case_control_in_header(rng):
    bad = rng.choice([b"\r", b"\x00", b"\x01", b"\x1b", b"\x7f", b"\x0b"])
    value = b"a" * rng.randint(0, 5) + bad + b"b" * rng.randint(0, 5)
    name = rng.choice([b"x-a", b"user-agent", b"x-session-id", b"accept", b"x-stainless-lang"])
    return with_length(head(headers=[name + b": " + value]), chat_body(rng))


def case_content_encoding(rng):
    body = chat_body(rng)
    encoding, data = rng.choice([
        (b"br", body), (b"zstd", body), (b"x-unknown", body), (b"gzip, gzip", gzip.compress(gzip.compress(body))),
        (b"gzip", b"not gzip at all"), (b"gzip", gzip.compress(body)[:-5]), (b"gzip", gzip.compress(body)),
        (b"deflate", zlib.compress(body)), (b"deflate", zlib.compress(body)[2:-4]), (b"identity", body),
        (b"GZIP", gzip.compress(body)), (b"gzip", gzip.compress(b'{"model": "m", "x": "' + b"0" * (4 * BODY_LIMIT) + b'"}')),
    ])
    return with_length(head(headers=[b"content-encoding: " + encoding]), data)


def case_huge_integer(rng):
    digits = b"1" * rng.randint(4301, 9000)
    where = rng.choice([b', "n": ' + digits, b', "temperature": ' + digits, b', "x": [' + digits + b"]"])
    return with_length(head(), chat_body(rng, extra=where))


def case_surrogates(rng):
    text = rng.choice([b'"\\ud800"', b'"\\udc00x"', b'"a\\ud83d"', b'"\\ud800\\ud800"'])
    extra = b', "user": ' + text + b', "stream_options": {"include_usage": false}'
    return with_length(head(), chat_body(rng, model=rng.choice([text, b'"m"']), extra=extra))


def case_duplicate_keys(rng):
    body = rng.choice([
        b'{"model": "a", "model": "b", "messages": []}', b'{"model": "a", "mod\\u0065l": "b"}',
        b'{"model": 1, "model": "m"}', b'{"stream": true, "stream": false, "model": "m"}',
    ])
    return with_length(head(), body)


def case_many_headers(rng, most: int):
    count = rng.randint(50, most)
    headers = [b"x-h%d: %d" % (i, i) for i in range(count)]
    return with_length(head(headers=headers), chat_body(rng))


def case_large_headers(rng):
    return with_length(head(headers=[b"x-big: " + b"v" * rng.randint(60_000, 200_000)]), chat_body(rng))


def case_oversized(rng):
    body = b'{"model": "m", "x": "' + b"0" * rng.randint(BODY_LIMIT, 3 * BODY_LIMIT) + b'"}'
    lines = head(auth=rng.random() < 0.5)
    return chunked(lines, body) if rng.random() < 0.5 else with_length(lines, body)


def case_unauthenticated(rng):
    body = chat_body(rng) + b" " * rng.randint(0, BODY_LIMIT // 2)
    lines = head(auth=False, headers=rng.choice([[], [b"authorization: Bearer wrong"], [b"x-api-key: " + UPSTREAM_KEY.encode()]]))
    return chunked(lines, body) if rng.random() < 0.3 else with_length(lines, body)


def case_garbage(rng):
    options = [
        lambda: with_length(head(method=bytes(rng.randrange(33, 127) for _ in range(rng.randint(1, 8)))), chat_body(rng)),
        lambda: with_length(head(path=b"/" + bytes(rng.randrange(33, 127) for _ in range(rng.randint(0, 30)))), chat_body(rng)),
        lambda: b"\r\n".join(head() + [b"content-length: 5, 7"]) + b"\r\n\r\nhello",
        lambda: b"\r\n".join(head() + [b"transfer-encoding: chunked"]) + b"\r\n\r\nzz\r\nbad\r\n0\r\n\r\n",
        lambda: b"\r\n".join(head() + [b"bad header line without colon"]) + b"\r\n\r\n",
        lambda: with_length(head(version=b"HTTP/1.0"), chat_body(rng)),
        lambda: with_length(head(method=b"GET", path=b"/health"), b""),
        lambda: with_length(head(headers=[b"content-type: text/plain", b"cookie: a=b"]), bytes(rng.randrange(256) for _ in range(40))),
    ]
    return rng.choice(options)()


def case_valid(rng):
    headers = rng.choice([[], [b"x-session-id: ses_%d" % rng.randrange(10**6)], [b"cookie: secret=1"], [b"user-agent: \xc3\xa9"]])
    return with_length(head(headers=headers, version=rng.choice([b"HTTP/1.1", b"HTTP/1.0"])), chat_body(rng))


def make_cases(seed: int, count: int, most_headers: int = 3000):
    """`count` cases as (kind, request bytes), deterministic for a seed."""
    rng = random.Random(seed)
    kinds = [
        ("control in header", case_control_in_header), ("content-encoding", case_content_encoding),
        ("huge integer", case_huge_integer), ("lone surrogate", case_surrogates),
        ("duplicate keys", case_duplicate_keys), ("many headers", lambda r: case_many_headers(r, most_headers)),
        ("large headers", case_large_headers), ("oversized body", case_oversized),
        ("unauthenticated", case_unauthenticated), ("malformed", case_garbage), ("valid", case_valid),
    ]
    for index in range(count):
        kind, make = kinds[index % len(kinds)]
        yield kind, make(rng)


# --- sending and checking -----------------------------------------------------------------------


def exchange(port: int, data: bytes, timeout: float = 20.0, method: bytes = b"POST"):
    """Send `data`, read one response: (status, headers, body), or None if the peer closed
    without answering. `method`: the request's, which decides whether a body follows."""
    conn = h11.Connection(h11.CLIENT)
    # h11 reads the response by the request's rules (no body after HEAD): tell it the method.
    conn.send(h11.Request(method=b"HEAD" if method == b"HEAD" else b"POST", target=b"/", headers=[("host", "x")]))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the gateway may answer and close before reading everything
        response, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk and response is None:
                    return None
                conn.receive_data(chunk)
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
    return response.status_code, headers, body


def problems_with(answer) -> list[str]:
    """What is wrong with one answer (empty when it is fine)."""
    if answer is None:
        return []
    status, headers, body = answer
    found = []
    if status >= 500:
        found.append(f"server error {status}")
    text = body + json.dumps(headers).encode()
    if PROXY_KEY.encode() in text or UPSTREAM_KEY.encode() in text:
        found.append("a key in the answer")
    if b"REVERSE TARGET" in body:
        found.append("answered by the reverse target")
    local = headers.get("x-ccx-gateway") == "local"
    routed = "x-ccx-channel" in headers
    if not (local or routed):
        found.append(f"not from the gateway: {status} {body[:80]!r}")
    if status >= 400:
        try:
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        except (ValueError, KeyError, TypeError, AssertionError):
            found.append(f"{status} not OpenAI-shaped: {body[:80]!r}")
    return found


def log_problems(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(p in line for p in LOG_PROBLEMS)]


def run(port: int, cases) -> dict:
    """Send every case; figures and the problems found."""
    figures = {"cases": 0, "answered": 0, "closed": 0, "by_status": collections.Counter(),
               "by_kind": collections.defaultdict(collections.Counter), "problems": []}
    for kind, data in cases:
        figures["cases"] += 1
        try:
            answer = exchange(port, data)
        except (socket.timeout, h11.RemoteProtocolError) as e:
            figures["problems"].append((kind, f"{type(e).__name__}: {e}", data[:120]))
            continue
        status = "closed" if answer is None else answer[0]
        figures["closed" if answer is None else "answered"] += 1
        figures["by_status"][status] += 1
        figures["by_kind"][kind][status] += 1
        figures["problems"] += [(kind, p, data[:120]) for p in problems_with(answer)]
    return figures
