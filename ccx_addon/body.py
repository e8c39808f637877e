"""Read a Chat Completions request body and rewrite it for an upstream. Pure functions.

The rewrite changes only the top-level `model` value in place, keeping every other byte,
which is faster than re-serializing ~30 KB agent requests and shows the user, in the flow
view, exactly what the client sent apart from the mapped model.
"""

import dataclasses
import functools
import json
import re
from typing import Any


class BodyError(ValueError):
    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    model: str
    stream: bool
    source: bytes = dataclasses.field(repr=False)  # the JSON body `data` is parsed from

    @functools.cached_property
    def data(self) -> dict[str, Any]:
        """The parsed body, built only when needed (echo, stream_usage, odd encodings).
        Not keeping ~30 KB agent requests as Python objects while the upstream answers
        saves time and, above all, garbage-collector work (see README, "Performance")."""
        return json.loads(self.source)


def parse_chat_request(raw: bytes) -> ChatRequest:
    if not raw.strip():
        raise BodyError(
            "The request body is empty; send a JSON object with model and messages.",
            "invalid_json",
        )
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise BodyError("The request body is not UTF-8 encoded JSON.", "invalid_json") from None
    except json.JSONDecodeError as e:
        raise BodyError(
            f"The request body is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}.",
            "invalid_json",
        ) from None
    except RecursionError:
        raise BodyError("The request body is nested too deeply.", "invalid_json") from None
    except ValueError as e:
        # Python refuses integers of more than 4,300 digits (CVE-2020-10735).
        raise BodyError(f"The request body holds a number the gateway cannot read: {e}.", "invalid_json") from None
    if not isinstance(data, dict):
        raise BodyError(
            f"The request body must be a JSON object, not {type(data).__name__}.",
            "invalid_request_body",
        )
    if "model" not in data:
        raise BodyError("You must provide a model parameter.", "missing_parameter", "model")
    if _may_repeat_model(raw) and _model_key_count(raw) > 1:
        # Upstreams disagree on which one counts; the gateway would route on the last.
        raise BodyError("The request body has more than one model key; send exactly one.",
                        "duplicate_parameter", "model")
    model = data["model"]
    if not isinstance(model, str) or not model.strip():
        raise BodyError(
            "The model parameter must be a non-empty string.", "invalid_type", "model"
        )
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BodyError("The stream parameter must be a boolean.", "invalid_type", "stream")
    return ChatRequest(model=model, stream=bool(stream), source=raw)


# An escaped ASCII letter (`"mod\u0065l"`), which could spell "model" without the bytes.
_ESCAPED_LETTER = re.compile(rb"\\u00[4-7][0-9a-fA-F]")


def _may_repeat_model(raw: bytes) -> bool:
    """Cheap test before the costly one: almost every body has `"model"` once, unescaped."""
    return raw.count(b'"model"') > 1 or _ESCAPED_LETTER.search(raw) is not None


def _model_key_count(raw: bytes) -> int:
    top = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    return sum(1 for key, _ in top if key == "model")


def dump_json(data: Any) -> bytes:
    """`data` as UTF-8 JSON; strings with lone surrogates (a client's `"\ud800"`) stay
    escaped as the client sent them instead of failing to encode."""
    try:
        return json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(data).encode()


# A JSON string literal, or one structural character.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]', re.DOTALL)
_COLON = re.compile(rb"\s*:\s*")
_MODEL_KEY = b'"model"'


def _top_level_model_values(raw: bytes) -> list[tuple[int, int]]:
    """Byte spans of every top-level `"model": "<value>"` string value."""
    spans = []
    depth = 0
    pos = 0
    while match := _TOKEN.search(raw, pos):
        token = match.group()
        pos = match.end()
        if token in (b"{", b"["):
            depth += 1
        elif token in (b"}", b"]"):
            depth -= 1
        elif depth == 1 and token == _MODEL_KEY:
            colon = _COLON.match(raw, pos)
            if colon is None:
                continue  # a value, not a key
            value = _TOKEN.match(raw, colon.end())
            if value is not None and value.group().startswith(b'"'):
                spans.append((value.start(), value.end()))
                pos = value.end()
    return spans


def replace_model(raw: bytes, request: ChatRequest, upstream_model: str) -> bytes:
    """`raw` with the top-level model set to `upstream_model`, all other bytes unchanged."""
    if upstream_model == request.model:
        return raw
    encoded = json.dumps(upstream_model).encode()
    if raw.count(_MODEL_KEY) == 1:
        # The common case: one occurrence; it is the top-level key if it sits at depth 1.
        start = raw.find(_MODEL_KEY)
        # Tokenize only up to the end of its value: the tokens before it give its depth.
        # (Cutting elsewhere can split a long string, which makes the scan quadratic.)
        colon = _COLON.match(raw, start + len(_MODEL_KEY))
        value = _TOKEN.match(raw, colon.end()) if colon else None
        stop = value.end() if value else start + len(_MODEL_KEY)
        spans = [s for s in _top_level_model_values(raw[:stop]) if s[0] > start]
        if len(spans) == 1 and _decodes_to(raw[spans[0][0]: spans[0][1]], request.model):
            begin, end = spans[0]
            return raw[:begin] + encoded + raw[end:]
    spans = _top_level_model_values(raw)
    if spans and all(_decodes_to(raw[b:e], request.model) for b, e in spans):
        out = bytearray()
        last = 0
        for begin, end in spans:
            out += raw[last:begin] + encoded
            last = end
        out += raw[last:]
        return bytes(out)
    # Unusual encodings (BOM, UTF-16): fall back to a full re-serialization.
    return dump_json({**request.data, "model": upstream_model})


def _decodes_to(literal: bytes, expected: str) -> bool:
    try:
        return json.loads(literal) == expected
    except ValueError:
        return False


def with_stream_usage(raw: bytes, request: ChatRequest) -> bytes:
    """Ask the upstream to report token usage at the end of a stream."""
    if not request.stream:
        return raw
    options = request.data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return raw
    data = json.loads(raw)
    merged = dict(options) if isinstance(options, dict) else {}
    merged["include_usage"] = True
    data["stream_options"] = merged
    return dump_json(data)
