"""The verdict table (verdicts.py) and learned caps (caps.py), called directly, with each
provider's real error shapes (shared/notes/providers.md)."""

import datetime
import json

import pytest

from ccx_addon.caps import LearnedCaps, announced_cap, apply_cap, requested_output
from ccx_addon.verdicts import (
    COOLDOWN, DISABLE, NEXT_CHANNEL, NEXT_KEY, REFUSE, SERVE, first_event_data, judge_answer,
    judge_first_event, parse_error_body, reset_time,
)


def dumps(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


# --- provider error fixtures (real shapes and texts) ----------------------------------------

def openai_error(message, type_, code=None, param=None):
    return dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def glm_error(code: str, message: str):
    return dumps({"error": {"code": code, "message": message}})  # code is a string, no type


def minimax_base_resp(code: int, message: str):
    return dumps({"id": "x", "choices": None, "base_resp": {"status_code": code, "status_msg": message}})


def minimax_error(type_: str, message: str, http_code="400"):
    return dumps({"type": "error", "error": {"type": type_, "message": message, "http_code": http_code}})


OPENAI_QUOTA = openai_error(
    "You exceeded your current quota, please check your plan and billing details.", "insufficient_quota",
    "insufficient_quota")
OPENAI_RATE = openai_error("Rate limit reached for gpt-5 in organization org-x on tokens per min (TPM).",
                           "requests", "rate_limit_exceeded")
OPENAI_BAD_KEY = openai_error("Incorrect API key provided: sk-***.", "invalid_request_error", "invalid_api_key")
# A 404 that quotes the client's model back: client-controlled text (issue 9, item 3).
OPENAI_MODEL_ECHO = openai_error(
    "The model `gpt-insufficient_quota` does not exist or you do not have access to it.",
    "invalid_request_error", "model_not_found")
DEEPSEEK_BALANCE = openai_error("Insufficient Balance", "unknown_error", "invalid_request_error")
DEEPSEEK_CAP = openai_error("Invalid max_tokens value, the valid range of max_tokens is [1, 8192]",
                            "invalid_request_error", "invalid_request_error")
DEEPSEEK_BUSY = openai_error("Server overloaded, please retry shortly.", "server_error", "server_overloaded")
GLM_BALANCE = glm_error("1113", "余额不足或无可用资源包,请充值。")
GLM_RATE = glm_error("1302", "您当前使用该API的并发数过高，请降低并发，或联系客服增加限额。")
GLM_5H = glm_error("1308", "已达到 5 小时的使用上限。您的限额将在 2030-01-02 03:04:05 重置。")
GLM_BAD_REQUEST = glm_error("1214", "messages 参数非法。请检查文档。")
KIMI_QUOTA = openai_error("Your account org-x <ak-x> is suspended, please check your plan and billing details",
                          "exceeded_current_quota_error")
KIMI_RATE = openai_error("Your account org-x request reached max request: 3, please try again after 1 seconds",
                         "rate_limit_reached_error")
KIMI_BUSY = openai_error("The engine is currently overloaded, please try again later", "engine_overloaded_error")
KIMI_TEMPERATURE = openai_error("invalid temperature: only 1 is allowed for this model", "invalid_request_error")
MINIMAX_BALANCE = minimax_base_resp(1008, "insufficient balance")
MINIMAX_RATE = minimax_base_resp(1002, "rate limit exceeded")
MINIMAX_TWO_SYSTEMS = minimax_base_resp(2013, "invalid params, chat content has invalid message role")
MINIMAX_PROXY_ERROR = minimax_error("bad_request_error", "invalid params, tools[0] function parameters is empty (2013)")


@pytest.mark.parametrize("preset, status, body, action, penalty", [
    # quota or balance used up: disable the key
    ("openai", 429, OPENAI_QUOTA, NEXT_KEY, DISABLE),
    ("", 429, OPENAI_QUOTA, NEXT_KEY, DISABLE),  # a structured code every channel understands
    ("deepseek", 402, DEEPSEEK_BALANCE, NEXT_KEY, DISABLE),
    ("glm", 429, GLM_BALANCE, NEXT_KEY, DISABLE),
    ("minimax", 200, MINIMAX_BALANCE, NEXT_KEY, DISABLE),
    ("", 200, MINIMAX_BALANCE, NEXT_KEY, DISABLE),  # base_resp codes are MiniMax's wherever seen
    ("kimi", 429, KIMI_QUOTA, NEXT_KEY, DISABLE),
    ("kimi", 403, KIMI_QUOTA, NEXT_KEY, DISABLE),
    # the key itself refused: disable
    ("openai", 401, OPENAI_BAD_KEY, NEXT_KEY, DISABLE),
    ("glm", 401, glm_error("1002", "Authorization Token非法"), NEXT_KEY, DISABLE),
    # rate limits: cool the key down
    ("openai", 429, OPENAI_RATE, NEXT_KEY, COOLDOWN),
    ("glm", 429, GLM_RATE, NEXT_KEY, COOLDOWN),
    ("glm", 429, GLM_5H, NEXT_KEY, COOLDOWN),
    ("kimi", 429, KIMI_RATE, NEXT_KEY, COOLDOWN),
    ("minimax", 200, MINIMAX_RATE, NEXT_KEY, COOLDOWN),
    ("", 429, b"", NEXT_KEY, COOLDOWN),
    ("", 429, b"<html>Too Many Requests</html>", NEXT_KEY, COOLDOWN),
    # overloaded: the next channel
    ("kimi", 429, KIMI_BUSY, NEXT_CHANNEL, ""),
    ("deepseek", 503, DEEPSEEK_BUSY, NEXT_CHANNEL, ""),
    ("glm", 429, glm_error("1305", "该模型当前访问量过大，请您稍后再试"), NEXT_CHANNEL, ""),
    ("", 500, openai_error("boom", "server_error"), NEXT_CHANNEL, ""),
    ("", 503, b"<html><h1>503 Service Unavailable</h1></html>", NEXT_CHANNEL, ""),
    ("", 408, b"", NEXT_CHANNEL, ""),
    # request errors every channel would refuse: tell the client
    ("glm", 400, GLM_BAD_REQUEST, SERVE, ""),
    ("kimi", 400, KIMI_TEMPERATURE, SERVE, ""),
    ("deepseek", 400, DEEPSEEK_CAP, SERVE, ""),
    ("minimax", 400, MINIMAX_PROXY_ERROR, SERVE, ""),
    ("minimax", 200, MINIMAX_TWO_SYSTEMS, REFUSE, ""),
    ("", 422, b"", SERVE, ""),
    # client-controlled text never decides: the model name quoted back
    ("openai", 404, OPENAI_MODEL_ECHO, SERVE, ""),
    ("", 404, OPENAI_MODEL_ECHO, SERVE, ""),
    ("", 400, openai_error("Your credit balance is too low (insufficient_quota, 余额)", "invalid_request_error"), SERVE, ""),
    ("glm", 400, glm_error("1214", 'model "1113" 余额 insufficient_quota'), SERVE, ""),
    # successes
    ("", 200, dumps({"choices": [], "error_count": 1}), SERVE, ""),
    ("minimax", 200, dumps({"choices": [], "base_resp": {"status_code": 0, "status_msg": ""}}), SERVE, ""),
])
def test_verdict_table(preset, status, body, action, penalty):
    verdict = judge_answer(status, body, preset, "application/json")
    assert (verdict.action, verdict.key_penalty) == (action, penalty)
    assert verdict.channel_failure == (action == NEXT_CHANNEL)
    if action != SERVE:
        assert verdict.reason.startswith(str(status))


def test_numeric_provider_codes_need_the_preset():
    # GLM's 1113 on a channel without a preset: only the status speaks (a rate limit).
    assert judge_answer(429, GLM_BALANCE, "").key_penalty == COOLDOWN
    assert judge_answer(429, GLM_BALANCE, "glm").key_penalty == DISABLE
    # The same number means different things: GLM's 1002 is a bad token, MiniMax's a rate limit.
    assert judge_answer(401, glm_error("1002", "x"), "glm").key_penalty == DISABLE
    assert judge_answer(200, minimax_base_resp(1002, "x"), "minimax").key_penalty == COOLDOWN
    assert judge_answer(200, glm_error("1002", "x"), "").action == NEXT_CHANNEL


def test_odd_successes_are_failed_attempts():
    html = b"<!DOCTYPE html><html><body>Login</body></html>"
    for content_type in ("text/html; charset=utf-8", "text/plain", "application/octet-stream"):
        verdict = judge_answer(200, html, "", content_type)
        assert (verdict.action, verdict.channel_failure) == (NEXT_CHANNEL, True)
        assert content_type.split(";")[0] in verdict.reason
    for status in (301, 302, 307, 308):
        assert judge_answer(status, b"", "", "text/html").action == NEXT_CHANNEL
    assert judge_answer(200, b'{"choices": []}', "", None).action == SERVE  # no content type, JSON body
    assert judge_answer(200, b"hello", "", None).action == NEXT_CHANNEL
    assert judge_answer(200, b'{"choices": []}', "", "application/json; charset=utf-8").action == SERVE


def test_error_in_success_bodies():
    # A third-party server's 429 as a 200 with a status in the error: a rate limit.
    third_party = dumps({"error": {"message": "Too many requests", "code": 429}})
    assert judge_answer(200, third_party).key_penalty == COOLDOWN
    # Unknown error without a status: the channel failed.
    verdict = judge_answer(200, openai_error("model overloaded, try later", "x"))
    assert (verdict.action, verdict.reason) == (NEXT_CHANNEL, "200 with an error body: model overloaded, try later")
    # A bare string error says nothing structured: the channel failed, no key penalty.
    assert judge_answer(200, dumps({"error": "insufficient_quota"})).key_penalty == ""
    # MiniMax's error shape with a stated 400: a request error, told to the client.
    assert judge_answer(200, MINIMAX_PROXY_ERROR, "minimax").action == REFUSE


def test_glm_1308_cools_down_until_the_announced_reset():
    verdict = judge_answer(429, GLM_5H, "glm")
    expected = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=8)))
    assert verdict.cool_until == expected.timestamp()
    assert reset_time("Your limit will reset at 2030-01-02 03:04:05") == expected.timestamp()
    assert reset_time("no date here") is None
    assert judge_answer(429, GLM_RATE, "glm").cool_until is None


def test_reasons_quote_the_upstream_briefly():
    assert judge_answer(503, openai_error("overloaded", "x")).reason == "503 overloaded"
    assert judge_answer(500, b"<!DOCTYPE html><html>...</html>").reason == "500"
    assert judge_answer(502, b"Bad gateway\nmore").reason == "502 Bad gateway"
    assert judge_answer(429, GLM_BALANCE, "glm").reason == "429 quota or balance used up: 余额不足或无可用资源包,请充值。 (code 1113)"


def test_parse_error_body_reads_only_structured_fields():
    error = parse_error_body(GLM_BALANCE)
    assert (error.code, error.type) == ("1113", "")
    assert parse_error_body(b'{"choices": [], "error": {"code": "1113"}}') is None  # an answer
    assert parse_error_body(b"not json") is None
    assert parse_error_body(b"[1, 2]") is None
    assert parse_error_body(b'{"error": {"code": 429}}').http_status == 429
    assert parse_error_body(b'{"error": {"code": true}}').http_status is None


# --- the first event of a stream -------------------------------------------------------------

def test_first_event_data():
    assert first_event_data(b"data: {") == (False, None)
    assert first_event_data(b": keep-alive\n\n") == (False, None)
    assert first_event_data(b": keep-alive\n\ndata: {\"a\": 1}\n\n") == (True, b'{"a": 1}')
    assert first_event_data(b"data: {\"a\": 1}\r\n\r\n") == (True, b'{"a": 1}')
    assert first_event_data(b"event: ping\n\n") == (True, None)
    assert first_event_data(b"data: [DONE]\n\ndata: x\n\n") == (True, b"[DONE]")


@pytest.mark.parametrize("preset, data, action, penalty", [
    ("", dumps({"error": {"message": "Rate limit exceeded", "type": "rate_limit_error", "code": 429}}), NEXT_KEY, COOLDOWN),
    ("", dumps({"error": {"message": "internal", "type": "server_error"}}), NEXT_CHANNEL, ""),
    ("minimax", dumps({"choices": None, "base_resp": {"status_code": 1008, "status_msg": "insufficient balance"}}), NEXT_KEY, DISABLE),
    ("minimax", dumps({"choices": None, "base_resp": {"status_code": 2013, "status_msg": "invalid params"}}), REFUSE, ""),
    ("openai", OPENAI_QUOTA, NEXT_KEY, DISABLE),
])
def test_error_first_events(preset, data, action, penalty):
    verdict = judge_first_event(data, preset)
    assert (verdict.action, verdict.key_penalty) == (action, penalty)


@pytest.mark.parametrize("data", [
    None, b"[DONE]", dumps({"choices": [{"delta": {"content": "insufficient_quota"}}]}),
    dumps({"choices": [], "base_resp": {"status_code": 0}}),
])
def test_normal_first_events_are_served(data):
    assert judge_first_event(data, "minimax") is None


# --- learned caps ---------------------------------------------------------------------------

def test_announced_caps():
    assert announced_cap(400, DEEPSEEK_CAP) == 8192
    assert announced_cap(400, openai_error(
        "max_tokens is too large: 32000. This model supports at most 16384 completion tokens, whereas you "
        "provided 32000.", "invalid_request_error", None, "max_tokens")) == 16384
    assert announced_cap(400, openai_error("max_tokens must be less than or equal to `4096`", "x")) == 4096
    assert announced_cap(429, DEEPSEEK_CAP) is None  # only a 400 announces a cap
    assert announced_cap(400, KIMI_TEMPERATURE) is None
    assert announced_cap(400, b"the valid range of max_tokens is [1, 8192]") is None  # not structured


def test_apply_cap_keeps_the_other_bytes():
    body = b'{"model": "m",  "max_tokens" :32000, "messages": [{"role": "user", "content": "\\ud83d x"}]}'
    capped, label = apply_cap(body, 8192)
    assert capped == body.replace(b'"max_tokens" :32000', b'"max_tokens": 8192')
    assert label == "max_tokens 32000→8192"
    assert apply_cap(body, 40000) == (body, "")
    assert requested_output(capped) == 8192
    # Ambiguous in place (the same text nested): re-serialised, both values right.
    nested = b'{"max_completion_tokens": 9000, "metadata": {"max_completion_tokens": 9000}}'
    capped, _ = apply_cap(nested, 100)
    assert json.loads(capped) == {"max_completion_tokens": 100, "metadata": {"max_completion_tokens": 9000}}


def test_learned_caps_are_bounded_and_only_go_down():
    caps = LearnedCaps(limit=3)
    caps.learn("ds", "deepseek-chat", 8192)
    caps.learn("ds", "deepseek-chat", 16384)
    assert caps.get("ds", "deepseek-chat") == 8192
    for i in range(5):
        caps.learn("ch", f"m{i}", 100)
    assert len(caps) == 3 and caps.get("ds", "deepseek-chat") is None
