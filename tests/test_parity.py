"""CCX channel parity end to end: several base URLs, per-key weights and limits, the
response model rewrite and per-channel TLS, through a real gateway (in-process mitmproxy,
and a real `mitmdump -s ccx_addon/addon.py` for TLS) and fake upstreams on 127.0.0.1."""

import datetime
import ipaddress
import re
import ssl
import threading
import time

import httpx
import openai
import pytest

from ccx_addon.explain import Explain
from chatclient import AUTH, CHAT, ask, chat_flows, error_of, events, health, wait_until
from conftest import PROXY_KEY, UPSTREAM_KEYS, channel, config
from fakeupstream import FakeUpstream, chunk_events, json_answer, openai_like, sse_answer
from harness import free_port

K1, K2, K3 = UPSTREAM_KEYS


def key_of(received) -> str:
    return received.headers["authorization"].removeprefix("Bearer ")


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


# --- several base URLs -------------------------------------------------------------------------

def test_a_dead_first_url_is_served_by_the_second_with_the_same_key(gateway, upstreams):
    up = upstreams()
    dead = dead_url()
    gw = gateway(config(
        f"  - name: multi\n    base_urls: [{dead}, {up.url}/v1]\n    api_keys: [\"{K1}\", \"{K2}\"]\n",
        top="circuit_breaker: {consecutive_failures: 2}\n",
    ))
    first = ask(gw)
    assert first.status_code == 200, first.text
    assert first.headers["x-ccx-channel"] == "multi" and first.headers["x-ccx-attempts"] == "2"
    assert key_of(up.received[0]) == K1  # the key that failed on the dead URL, not the next one
    [flow] = chat_flows(gw, 1)
    attempts = flow.metadata["ccx"]["attempts"]
    assert [a["url"] for a in attempts] == [f"{dead}/chat/completions", f"{up.url}/v1/chat/completions"]
    assert [a["key"] for a in attempts] == ["multi#1", "multi#1"]
    assert attempts[0]["outcome"].startswith("cannot connect: Connection refused")
    assert flow.request.url == f"{up.url}/v1/chat/completions"

    # Health is per URL: after two failures the dead URL's circuit opens, the channel serves on.
    assert ask(gw, stream=True).status_code == 200
    channels = health(gw)
    assert channels["multi"]["urls"] == {f"{dead}/chat/completions": "open", f"{up.url}/v1/chat/completions": "closed"}
    assert channels["multi"]["circuit"] == "closed"  # the channel serves while one URL does
    third = ask(gw)
    assert third.status_code == 200 and third.headers["x-ccx-attempts"] == "1"
    assert len(up.received) == 3


def test_a_5xx_on_one_url_moves_to_the_next_url_before_the_next_channel(gateway, upstreams):
    broken = upstreams(lambda r: json_answer(503, {"error": {"message": "overloaded", "type": "x", "param": None, "code": None}}))
    mirror = upstreams()
    other = upstreams()
    gw = gateway(config(
        f"  - name: multi\n    base_urls: [{broken.url}/v1, {mirror.url}/v1]\n    api_keys: [\"{K1}\"]\n",
        channel("other", other.url + "/v1", keys=(K2,)),
    ))
    r = ask(gw)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "multi"
    assert [key_of(x) for x in broken.received + mirror.received] == [K1, K1] and not other.received
    # Every URL failing gives the channel up: the next channel serves.
    dead_both = gateway(config(
        f"  - name: multi\n    base_urls: [{broken.url}/v1, {dead_url()}]\n    api_keys: [\"{K1}\"]\n",
        channel("other", other.url + "/v1", keys=(K2,)),
    ))
    r = ask(dead_both)
    assert r.status_code == 200 and r.headers["x-ccx-channel"] == "other" and r.headers["x-ccx-attempts"] == "3"


def test_a_channel_whose_every_url_circuit_is_open_is_skipped_naming_each_url(gateway, upstreams):
    other = upstreams()
    first, second = dead_url(), dead_url()
    gw = gateway(config(
        f"  - name: multi\n    base_urls: [{first}, {second}]\n    api_keys: [\"{K1}\"]\n",
        channel("other", other.url + "/v1", keys=(K2,)),
        top="circuit_breaker: {consecutive_failures: 1}\n",
    ))
    assert ask(gw).headers["x-ccx-attempts"] == "3"
    r = ask(gw)
    assert r.status_code == 200 and r.headers["x-ccx-attempts"] == "1"
    skipped = chat_flows(gw, 2)[-1].metadata["ccx"]["attempts"][0]
    assert re.fullmatch(
        rf"skipped: {re.escape(first)}/chat/completions: circuit open after repeated failures, next probe in [45]s; "
        rf"{re.escape(second)}/chat/completions: circuit open after repeated failures, next probe in [45]s",
        skipped["outcome"],
    ), skipped
    assert health(gw)["multi"]["circuit"] == "open"


# --- key limits and weights --------------------------------------------------------------------

def test_rpm_2_lets_exactly_two_requests_through_then_429_or_elsewhere(gateway, upstreams):
    limited, spare = upstreams(), upstreams()
    gw = gateway(config(
        f"  - name: limited\n    base_url: {limited.url}/v1\n    api_keys: [{{key: \"{K1}\", rpm: 2}}]\n"
        f"    supported_models: [m, n]\n",
        channel("spare", spare.url + "/v1", keys=(K2,), extra="supported_models: [n]"),
    ))
    assert [ask(gw).status_code for _ in range(2)] == [200, 200]
    third = ask(gw)
    assert len(limited.received) == 2  # the third was never sent to the key at its limit
    assert third.status_code == 429
    error = error_of(third)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "limited#1 (rpm 2 reached" in error["message"] and "rpm" in error["message"]
    assert 55 <= int(third.headers["retry-after"]) <= 60
    assert K1 not in third.text and PROXY_KEY not in third.text
    # A model another channel serves goes there while the key rests.
    served = ask(gw, model="n")
    assert served.status_code == 200 and served.headers["x-ccx-channel"] == "spare"
    assert len(limited.received) == 2 and len(spare.received) == 1
    assert health(gw)["limited"]["keys"][0]["at_limit"].startswith("rpm 2 reached")
    explained = gw.call(gw.addon(Explain).explain, "m")
    assert "key limits: limited#1 rpm 2" in explained
    assert "now: keys at their limit limited#1 (rpm 2 reached" in explained


def stream_in_thread(gw, results: list, started: threading.Event) -> threading.Thread:
    def run():
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", gw.url + CHAT, json=body, headers=AUTH, timeout=30) as response:
            text = b""
            for piece in response.iter_bytes():
                text += piece
                started.set()
            results.append((response.headers.get("x-ccx-channel"), text.decode()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_max_concurrency_1_sends_a_second_concurrent_stream_elsewhere(gateway, upstreams):
    slow_events = chunk_events("m", [f"e{i}" for i in range(6)], usage=False)
    slow = upstreams(lambda r: sse_answer(slow_events, delay=0.25))
    spare = upstreams()
    gw = gateway(config(
        f"  - name: slow\n    base_url: {slow.url}/v1\n    api_keys: [{{key: \"{K1}\", max_concurrency: 1}}]\n",
        channel("spare", spare.url + "/v1", keys=(K2,)),
    ))
    results: list = []
    first_started = threading.Event()
    first = stream_in_thread(gw, results, first_started)
    assert first_started.wait(10)
    second = stream_in_thread(gw, results, threading.Event())
    second.join(20)
    first.join(20)
    assert sorted(channel for channel, _ in results) == ["slow", "spare"]
    assert [channel for channel, _ in results] == ["spare", "slow"]  # the second ended first
    assert all(text.rstrip().endswith("data: [DONE]") for _, text in results)
    assert len(slow.received) == 1 and len(spare.received) == 1
    # The slot frees at the stream's last byte: the next request goes to the slow key again.
    assert wait_until(lambda: "at_limit" not in health(gw)["slow"]["keys"][0])
    assert ask(gw).headers["x-ccx-channel"] == "slow"


def test_weights_3_to_1_over_40_requests(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(
        f"  - name: pool\n    base_url: {up.url}/v1\n    api_keys: [{{key: \"{K1}\", weight: 3}}, \"{K2}\"]\n"
    ))
    for _ in range(40):
        assert ask(gw).status_code == 200
    keys = [key_of(r) for r in up.received]
    assert abs(keys.count(K1) - 30) <= 3 and abs(keys.count(K2) - 10) <= 3
    assert len(keys) == 40


# --- response model rewrite ---------------------------------------------------------------------

def test_rewrite_response_model_in_every_chunk_and_the_json_answer(gateway, upstreams):
    up = upstreams()  # answers name the model they were sent: deepseek-chat
    gw = gateway(config(
        channel("ds", up.url + "/v1", extra="model_mapping: {gpt: deepseek-chat}\nrewrite_response_model: true"),
    ))
    sdk = openai.OpenAI(base_url=gw.url + "/v1", api_key=PROXY_KEY, max_retries=0)
    reply = sdk.chat.completions.with_raw_response.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert reply.parse().model == "gpt-5" and reply.parse().choices[0].message.content == "hello from upstream"
    assert reply.headers["x-ccx-answer-model"] == "deepseek-chat"
    assert up.received[0].json["model"] == "deepseek-chat"

    stream = ask(gw, stream=True, model="gpt-5")
    payloads = [p for p in events(stream.text) if isinstance(p, dict)]
    assert len(payloads) == 6 and {p["model"] for p in payloads} == {"gpt-5"}
    assert stream.headers["x-ccx-answer-model"] == "deepseek-chat"
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads if p["choices"]) == "hello from upstream"
    chunks = list(sdk.chat.completions.create(model="gpt-5", messages=[], stream=True))
    assert chunks and all(c.model == "gpt-5" for c in chunks)
    flows = chat_flows(gw, 3)
    assert all(f.response.headers["x-ccx-answer-model"] == "deepseek-chat" for f in flows)


def test_rewrite_is_off_by_default_and_per_channel_wins_over_top_level(gateway, upstreams):
    up = upstreams()
    gw = gateway(config(
        channel("plain", up.url + "/v1", extra="model_mapping: {gpt: deepseek-chat}\nrewrite_response_model: false"),
        top="rewrite_response_model: true\n",
    ))
    assert ask(gw, model="gpt-5").json()["model"] == "deepseek-chat"
    assert "data: {\"id\": \"chatcmpl-fake\", \"object\": \"chat.completion.chunk\", \"created\": 1, \"model\": \"deepseek-chat\"" in ask(
        gw, stream=True, model="gpt-5").text  # untouched, byte for byte
    default = gateway(config(channel("plain", up.url + "/v1", extra="model_mapping: {gpt: deepseek-chat}")))
    r = ask(default, model="gpt-5")
    assert r.json()["model"] == "deepseek-chat" and "x-ccx-answer-model" not in r.headers
    top = gateway(config(channel("plain", up.url + "/v1", extra="model_mapping: {gpt: deepseek-chat}"),
                         top="rewrite_response_model: true\n"))
    assert ask(top, model="gpt-5").json()["model"] == "gpt-5"


# --- TLS ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """PEM files: a private CA (ca.pem) and a certificate it signed for 127.0.0.1 with
    its key (private-ca.pem); a self-signed certificate for 127.0.0.1 (self-signed.pem,
    its own CA file: self-signed-ca.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca: bool, extensions=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ccx test private CA")])
    ca_cert = build(ca_name, ca_name, ca_key.public_key(), ca_key, True, [
        x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                      key_encipherment=False, data_encipherment=False, key_agreement=False,
                      encipher_only=False, decipher_only=False),
        x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
    ])
    leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, leaf_key.public_key(), ca_key, False, [
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
    ])
    own_key = ec.generate_private_key(ec.SECP256R1())
    own_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    own = build(own_name, own_name, own_key.public_key(), own_key, False, [
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
    ])
    pem = serialization.Encoding.PEM

    def private(key):
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "private-ca.pem").write_bytes(leaf.public_bytes(pem) + private(leaf_key))
    (folder / "self-signed-ca.pem").write_bytes(own.public_bytes(pem))
    (folder / "self-signed.pem").write_bytes(own.public_bytes(pem) + private(own_key))
    return folder


def https_upstream(chain) -> FakeUpstream:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    return FakeUpstream(openai_like, ssl_context=context)


@pytest.mark.parametrize("kind, ca_file", [("private-ca", "ca.pem"), ("self-signed", "self-signed-ca.pem")])
def test_https_upstream_fails_by_default_and_serves_with_tls_verify_false_or_ca_file(mitmdump, certificates, kind, ca_file):
    up = https_upstream(certificates / f"{kind}.pem").start()
    try:
        gw = mitmdump(config(
            channel("strict", up.url + "/v1", keys=(K1,)),
            channel("insecure", up.url + "/v1", keys=(K2,), extra="tls_verify: false\nsupported_models: [insecure]"),
            channel("private", up.url + "/v1", keys=(K3,), extra=f"ca_file: {certificates / ca_file}\nsupported_models: [private]"),
        ))
        failed = ask(gw, model="m")
        assert failed.status_code == 502, failed.text
        message = error_of(failed)["message"]
        why = "unable to get local issuer certificate" if kind == "private-ca" else "self.signed certificate"
        assert re.search(rf"strict \(strict#1\): TLS certificate problem \({why}\) at 127\.0\.0\.1:{up.port}: ", message)
        assert "ca_file" in message and "tls_verify: false" in message
        assert K1 not in message and not up.received  # nothing was sent over the unverified connection

        for model, key in (("insecure", K2), ("private", K3)):
            r = ask(gw, model=model)
            assert r.status_code == 200, r.text
            assert r.headers["x-ccx-channel"] == model and key_of(up.received[-1]) == key
            s = ask(gw, model=model, stream=True)
            assert s.status_code == 200 and events(s.text)[-1] == "[DONE]"
        assert all(secret not in gw.log() for secret in (PROXY_KEY, *UPSTREAM_KEYS))
        assert "TLS certificate problem" in gw.log()
    finally:
        up.stop()
