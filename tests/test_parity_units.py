"""CCX channel parity, pure parts: key weights and limits with an explicit `now`, the
stream model rewrite chunk by chunk, and config validation of the new fields."""

import json

import pytest

from ccx_addon.config import ConfigError, KeyLimit, parse_config
from ccx_addon.explain import describe_channel, explain_model, format_explanation
from ccx_addon.health import HealthRegistry, KeyPool
from ccx_addon.keylimits import RPM_WINDOW
from ccx_addon.modelrewrite import ModelRewrite, first_model, rewrite_model

T0 = 1_000_000.0


def pool_of(*limits: KeyLimit) -> KeyPool:
    text = "proxy_access_keys: [p]\nchannels:\n  - name: c\n    base_url: http://127.0.0.1:1/v1\n    api_keys:\n"
    for i, limit in enumerate(limits):
        fields = {"key": f"k{i}", **{k: v for k, v in vars(limit).items() if v is not None}}
        text += "      - " + json.dumps(fields) + "\n"
    return HealthRegistry(parse_config(text)).pools["c"]


def test_rpm_counts_requests_started_in_the_last_60_seconds():
    pool = pool_of(KeyLimit(rpm=2))
    limits = pool.limits
    assert pool.pick(T0, set()) == (0, "")
    limits.acquire(0, T0)
    limits.acquire(0, T0 + 10).release()  # a finished request still counts for the minute
    index, why = pool.pick(T0 + 20, set())
    assert index is None and "c#1 at its limit: rpm 2 reached, a slot frees in 40s" in why
    assert pool.soonest_ready(T0 + 20) == T0 + RPM_WINDOW
    assert pool.at_limit(T0 + 20) == ["c#1 (rpm 2 reached, a slot frees in 40s)"]
    # The first start leaves the window: one slot, then full again.
    assert pool.pick(T0 + RPM_WINDOW, set()) == (0, "")
    limits.acquire(0, T0 + RPM_WINDOW)
    assert pool.pick(T0 + RPM_WINDOW + 1, set())[0] is None
    assert pool.pick(T0 + 10 + RPM_WINDOW, set())[0] == 0


def test_max_concurrency_counts_requests_in_flight_until_released():
    pool = pool_of(KeyLimit(max_concurrency=1), KeyLimit())
    lease = pool.limits.acquire(0, T0)
    assert [pool.pick(T0, set())[0] for _ in range(3)] == [1, 1, 1]  # key 1 skipped while busy
    lease.release()
    lease.release()  # idempotent: a second release frees nothing more
    assert pool.limits.usage[0].in_flight == 0
    assert pool.pick(T0, set())[0] == 0


def test_weights_share_the_rotation_smoothly():
    pool = pool_of(KeyLimit(weight=3), KeyLimit())
    picks = [pool.pick(T0, set())[0] for _ in range(40)]
    assert picks.count(0) == 30 and picks.count(1) == 10
    assert picks[:8] == [0, 0, 1, 0, 0, 0, 1, 0]  # spread out: 0 0 1 0, again and again
    # A key that cannot serve is skipped; the other takes its turn.
    pool.cool_down(0, 30, T0)
    assert [pool.pick(T0, set())[0] for _ in range(3)] == [1, 1, 1]


def test_equal_weights_keep_plain_round_robin():
    pool = pool_of(KeyLimit(), KeyLimit(), KeyLimit())
    assert [pool.pick(T0, set())[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert pool.pick(T0, {0})[0] == 1 and pool.pick(T0, set())[0] == 2


def test_reload_keeps_counts_of_keys_still_configured():
    text = ('proxy_access_keys: [p]\nchannels:\n  - name: c\n    base_url: http://127.0.0.1:1/v1\n'
            '    api_keys: [{key: k0, rpm: 1, max_concurrency: 1}]\n')
    old = HealthRegistry(parse_config(text))
    lease = old.pools["c"].limits.acquire(0, T0)
    new = HealthRegistry(parse_config(text.replace("rpm: 1", "rpm: 2")), previous=old)
    assert "max_concurrency 1 reached" in new.pools["c"].limits.blocked(0, T0)
    lease.release()  # a request of the old config releases the shared count
    assert new.pools["c"].limits.blocked(0, T0) == ""


# --- the stream model rewrite ---------------------------------------------------------------

STREAM = (
    b": keep-alive\n\n"
    b'data: {"id":"x","model":"deepseek-chat","choices":[{"delta":{"content":"hi \\"model\\": y"}}]}\n\n'
    b"event: ping\r\ndata: {\"model\": \"deepseek-chat\", \"choices\": []}\r\n\r\n"
    b"data: not json\n\n"
    b"data: [DONE]\n\n"
)


def rewritten(chunks) -> tuple[bytes, list[bytes], ModelRewrite]:
    rewrite = ModelRewrite("gpt-5")
    outs = [rewrite.feed(c) for c in chunks]
    return b"".join(outs) + rewrite.end(), outs, rewrite


def test_rewrite_replaces_model_in_every_data_line_only():
    whole, _, rewrite = rewritten([STREAM])
    lines = whole.split(b"\n")
    payloads = [json.loads(line[5:]) for line in lines if line.startswith(b"data: {")]
    assert [p["model"] for p in payloads] == ["gpt-5", "gpt-5"]
    assert payloads[0]["choices"][0]["delta"]["content"] == 'hi "model": y'  # content untouched
    assert rewrite.original == "deepseek-chat"
    assert b": keep-alive\n\n" in whole and b"event: ping\r\n" in whole and b"data: not json\n\n" in whole
    assert whole.endswith(b"data: [DONE]\n\n") and whole.count(b"\r\n") == 3


def test_rewrite_is_the_same_however_the_bytes_are_cut():
    whole, _, _ = rewritten([STREAM])
    one_by_one, _, _ = rewritten([STREAM[i:i + 1] for i in range(len(STREAM))])
    sevens, _, _ = rewritten([STREAM[i:i + 7] for i in range(0, len(STREAM), 7)])
    assert one_by_one == whole == sevens


def test_rewrite_holds_back_only_an_unfinished_data_line():
    rewrite = ModelRewrite("gpt-5")
    assert rewrite.feed(b": comm") == b": comm"  # not a data line: on at once
    assert rewrite.feed(b"ent\n\nda") == b"ent\n\n"  # "da" may become "data:"
    assert rewrite.feed(b'ta: {"model": "up"}') == b""
    assert rewrite.feed(b"\n\n") == b'data: {"model": "gpt-5"}\n\n'
    assert rewrite.feed(b"data: [DO") == b""
    assert rewrite.end() == b"data: [DO"  # the upstream ended: nothing is kept


def test_json_answer_rewrite_and_first_model():
    body, original = rewrite_model(b'{"model": "up-1", "choices": []}', "gpt-5")
    assert json.loads(body) == {"model": "gpt-5", "choices": []} and original == "up-1"
    assert rewrite_model(b'{"error": {}}', "gpt-5") == (b'{"error": {}}', None)
    assert rewrite_model(b"[1]", "gpt-5") == (b"[1]", None)
    assert first_model(b': c\n\ndata: {"model": "up-2"}\n\n') == "up-2"
    # Only the top-level key, whatever comes first; every other byte stays (fast path).
    body, original = rewrite_model(b'{"meta": {"model": "x"}, "model": "up"}', "gpt-5")
    assert json.loads(body) == {"meta": {"model": "x"}, "model": "gpt-5"} and original == "up"
    assert rewrite_model(b'{"choices": [{"model": "x"}]}', "gpt-5") == (b'{"choices": [{"model": "x"}]}', None)
    assert rewrite_model(b'{"id": "{", "model": "up"}', "gpt-5")[0] == b'{"id":"{","model":"gpt-5"}'  # parsed
    assert rewrite_model(b'{"id" : 1,  "model" : "\\u00e9t\\"e"}', "g\u00e9")[0] == '{"id" : 1,  "model" : "g\u00e9"}'.encode()
    assert first_model(b'data: {"model": "up') is None


# --- config -----------------------------------------------------------------------------------

def parse(channel_yaml: str, top: str = ""):
    return parse_config(f"proxy_access_keys: [p]\n{top}channels:\n  - name: c\n{channel_yaml}", "ccx.yaml", {})


def test_new_fields_parse_with_their_defaults():
    cfg = parse("    base_urls: [http://127.0.0.1:1/v1, http://127.0.0.1:2/v1/]\n"
                "    api_keys: [plain, {key: k2, weight: 3, rpm: 60, max_concurrency: 2}, {key: '${UNSET:-}'}]\n",
                "rewrite_response_model: true\n")
    c = cfg.channels[0]
    assert c.base_url == "http://127.0.0.1:1/v1" and c.chat_urls == (
        "http://127.0.0.1:1/v1/chat/completions", "http://127.0.0.1:2/v1/chat/completions")
    assert c.api_keys == ("plain", "k2")  # the empty entry is dropped with its limits
    assert c.limit_of(0) == KeyLimit() and c.limit_of(1) == KeyLimit(3, 60, 2)
    assert cfg.rewrites_model(c) and c.tls_verify and c.ca_file == ""
    plain = parse("    base_url: https://x.example/v1\n    api_keys: [k]\n    rewrite_response_model: false\n",
                  "rewrite_response_model: true\n")
    assert not plain.rewrites_model(plain.channels[0]) and plain.channels[0].key_limits == ()


@pytest.mark.parametrize("channel_yaml, message", [
    ("    base_url: http://a/v1\n    base_urls: [http://b/v1]\n    api_keys: [k]\n",
     "line 5, channels[0].base_urls: write either base_url or base_urls, not both"),
    ("    api_keys: [k]\n", "missing required field 'base_url' (or 'base_urls')"),
    ("    base_urls: []\n    api_keys: [k]\n", "channels[0].base_urls: must list at least one URL"),
    ("    base_urls: [http://a/v1, ftp://b]\n    api_keys: [k]\n", "channels[0].base_urls[1]: must start with http://"),
    ("    base_urls: [http://a/v1, http://a/v1/]\n    api_keys: [k]\n", "base_urls[1]: the same URL twice"),
    ("    base_url: http://a/v1\n    api_keys: [{key: sk-secret-1, rpm: 0}]\n", "api_keys[0].rpm: must be at least 1"),
    ("    base_url: http://a/v1\n    api_keys: [{key: sk-secret-1, weight: 1.5}]\n", "api_keys[0].weight: must be a whole number"),
    ("    base_url: http://a/v1\n    api_keys: [{key: sk-secret-1, burst: 2}]\n", "api_keys[0].burst: unknown field"),
    ("    base_url: http://a/v1\n    api_keys: [{weight: 2}]\n", "api_keys[0]: missing required field 'key'"),
    ("    base_url: http://a/v1\n    api_keys: [k]\n    tls_verify: false\n", "tls_verify: applies to https:// upstreams only"),
    ("    base_url: https://a/v1\n    api_keys: [k]\n    ca_file: /nonexistent/ca.pem\n", "ca_file: no such file: /nonexistent/ca.pem"),
    ("    base_url: https://a/v1\n    api_keys: [k]\n    rewrite_response_model: maybe\n", "rewrite_response_model: must be true or false"),
])
def test_invalid_new_fields_name_file_line_and_field_never_the_key(channel_yaml, message):
    with pytest.raises(ConfigError) as e:
        parse(channel_yaml)
    assert message in str(e.value) and str(e.value).startswith("ccx.yaml, line")
    assert "sk-secret" not in str(e.value)


def test_ca_file_must_hold_a_certificate_and_is_found_next_to_the_config(tmp_path):
    (tmp_path / "bad.pem").write_text("not a certificate")
    config = tmp_path / "ccx.yaml"
    text = "proxy_access_keys: [p]\nchannels:\n  - {name: c, base_url: 'https://a/v1', api_keys: [k], ca_file: bad.pem}\n"
    with pytest.raises(ConfigError, match=r"ca_file: .*bad.pem holds no usable PEM certificate"):
        parse_config(text, str(config), {})


def test_explain_shows_urls_key_limits_and_rewrite():
    cfg = parse("    base_urls: [http://127.0.0.1:1/v1, http://127.0.0.1:2/v1]\n"
                "    api_keys: [{key: sk-secret-1, weight: 3, rpm: 60, max_concurrency: 2}, sk-secret-2]\n"
                "    rewrite_response_model: true\n")
    text = format_explanation(explain_model(cfg, "gpt-5"))
    assert "http://127.0.0.1:1/v1/chat/completions, then http://127.0.0.1:2/v1/chat/completions" in text
    assert "c#1 weight 3, rpm 60, max_concurrency 2" in text
    assert "answers name the requested model (rewrite_response_model)" in text
    summary = describe_channel(cfg.channels[0], cfg)
    assert "then http://127.0.0.1:2/v1/chat/completions" in summary and "rpm 60" in summary
    assert "rewrite_response_model" in summary and "sk-secret" not in text + summary
