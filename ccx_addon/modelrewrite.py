"""`rewrite_response_model`: the answer names the model the client asked for, not the
upstream's. Pure: a JSON body rewrite and a stream transform (handover.StreamTransform)
that rewrites complete `data:` lines and passes every other byte on at once."""

import functools
import json
import re

_DATA = b"data:"


# A "model" key with a string value. A raw `"` in JSON text always delimits a string, so
# this cannot match inside one (quotes there are escaped).
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


def rewrite_model(data: bytes, model: str) -> tuple[bytes, str | None]:
    """A JSON object's top-level `model` set to `model`: (the new bytes, the model it named),
    or `data` unchanged and None when it is not such an object."""
    if (fast := _splice_model(data, model)) is not None:
        return fast
    try:
        payload = json.loads(data)
    except ValueError:
        return data, None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), str):
        return data, None
    original = payload["model"]
    if original == model:
        return data, original
    payload["model"] = model
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode(), original


def _splice_model(data: bytes, model: str) -> tuple[bytes, str | None] | None:
    """The fast path (the stream's hot loop): when `data` has exactly one "model" key and
    nothing before it can open a nested value (one `{`, no `[`), it is the top-level key:
    replace its value in place, every other byte unchanged. None: parse instead."""
    if data.count(b'"model"') != 1:
        return None
    match = _MODEL_KEY.search(data)
    if match is None:
        return None
    prefix = data[:match.start()]
    if prefix.count(b"{") != 1 or b"[" in prefix or not prefix.lstrip().startswith(b"{"):
        return None
    original = _decoded(match.group(1))
    if original is None:
        return None
    if original == model:
        return data, original
    return data[:match.start(1) - 1] + _encoded(model) + data[match.end(1) + 1:], original


# A stream names the same model in every chunk: decode and encode it once.
@functools.lru_cache(maxsize=64)
def _decoded(raw: bytes) -> str | None:
    try:
        return json.loads(b'"' + raw + b'"')
    except ValueError:
        return None


@functools.lru_cache(maxsize=64)
def _encoded(model: str) -> bytes:
    return json.dumps(model, ensure_ascii=False).encode()


def first_model(events: bytes) -> str | None:
    """The `model` the first `data:` line of `events` names, if complete and JSON."""
    for line in events.split(b"\n")[:-1]:
        if line.startswith(_DATA):
            return rewrite_model(line[len(_DATA):], "")[1]
    return None


def rewrite_buffered(body: bytes, content_type: str, model: str) -> tuple[bytes, str | None]:
    """A whole answer (JSON, or events the gateway made from JSON) with `model` rewritten,
    and the model the upstream named."""
    if "event-stream" in content_type:
        rewrite = ModelRewrite(model)
        body = rewrite.feed(body) + rewrite.end()
        return body, rewrite.original
    return rewrite_model(body, model)


class ModelRewrite:
    """Rewrites `model` in each SSE `data:` line. Only a line that is (or may become) a
    `data:` line waits for its end; everything else goes on as it arrives."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.original: str | None = None  # what the upstream's first chunk named
        self._held = b""  # the start of a data: line whose end has not come yet
        self._passing = False  # inside a line that is not data: (already passed on)

    def feed(self, chunk: bytes) -> bytes:
        out = []
        start = 0
        while start < len(chunk):
            end = chunk.find(b"\n", start)
            if self._passing:
                piece = chunk[start:] if end < 0 else chunk[start:end + 1]
                out.append(piece)
                self._passing = end < 0
                start += len(piece)
                continue
            line = self._held + (chunk[start:] if end < 0 else chunk[start:end + 1])
            start = len(chunk) if end < 0 else end + 1
            if end >= 0:
                self._held = b""
                out.append(self._rewrite(line))
            elif line.startswith(_DATA) or _DATA.startswith(line):
                self._held = line  # incomplete data: line: wait for its end
            else:
                self._held = b""
                out.append(line)
                self._passing = True
        return b"".join(out)

    def end(self) -> bytes:
        rest, self._held = self._held, b""
        return rest

    def _rewrite(self, line: bytes) -> bytes:
        if not line.startswith(_DATA):
            return line
        body = line[len(_DATA):]
        value = body.rstrip(b"\r\n")
        lead = len(value) - len(value.lstrip())
        payload, original = rewrite_model(value[lead:], self.model)
        if self.original is None:
            self.original = original
        if original is None or original == self.model:
            return line
        return _DATA + value[:lead] + payload + body[len(value):]
