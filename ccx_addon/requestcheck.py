"""Checks on what a client sends, decided before any work is spent on it: header count and
size, bytes no header may hold, and request content encodings (decoded with a cap). Pure
functions; each refusal is a `RequestRefused` with a message that says what to fix."""

import re
import zlib

from .errors import RequestRefused

# Any control character but horizontal tab. mitmproxy passes a bare CR or NUL inside a value
# on; HTTP forbids them (RFC 9110, 5.5) and the upstream client refuses to send them.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")
_DECODE_STEP = 64 * 1024


def header_limits(fields: tuple[tuple[bytes, bytes], ...], max_count: int, max_bytes: int) -> RequestRefused | None:
    """431 when there are more than `max_count` headers or they hold more than `max_bytes`.
    Linear in the header count: 20,000 headers must cost milliseconds, not seconds."""
    if len(fields) > max_count:
        return RequestRefused(
            431, f"The request has {len(fields)} headers; the gateway accepts at most {max_count} "
            "(option ccx_max_header_count).", "request_header_fields_too_large",
        )
    size = sum(len(name) + len(value) + 4 for name, value in fields)
    if size > max_bytes:
        return RequestRefused(
            431, f"The request headers are {size} bytes; the gateway accepts at most {max_bytes} "
            "(option ccx_max_header_size).", "request_header_fields_too_large",
        )
    return None


def bad_header(fields: tuple[tuple[bytes, bytes], ...]) -> RequestRefused | None:
    """400 for a header name or value holding a control character (CR, LF, NUL, ...)."""
    for name, value in fields:
        if _CONTROL.search(name) or _CONTROL.search(value):
            shown = name.decode("ascii", "backslashreplace")[:60]
            return RequestRefused(
                400, f"The header {shown!r} contains a control character (such as CR, LF or "
                "NUL), which HTTP does not allow in headers. Remove it.", "invalid_header",
            )
    return None


def content_encodings(header: str) -> list[str]:
    """The codings of a Content-Encoding header, in the order they were applied. 415 for any
    the gateway does not decode, or for more than one."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if any(c not in ACCEPTED_ENCODINGS for c in codings) or len(codings) > 1:
        shown = header.strip()[:60]
        raise RequestRefused(
            415, f"The request's Content-Encoding {shown!r} is not accepted; send the body "
            f"uncompressed, or compressed once with one of: {', '.join(ACCEPTED_ENCODINGS)}.",
            "unsupported_content_encoding",
        )
    return codings


def decode_body(raw: bytes, header: str, limit: int) -> bytes:
    """The body with its Content-Encoding undone, never inflating past `limit` bytes (a 1 MB
    gzip body can hold gigabytes): 413 beyond it, 400 when it is not what it says it is."""
    codings = content_encodings(header)
    if not codings:
        return raw
    coding = codings[0]
    # gzip; deflate is the zlib format, but some clients send raw deflate: try both.
    attempts = (31,) if coding == "gzip" else (15, -15)
    for wbits in attempts:
        try:
            return _inflate(raw, wbits, limit)
        except zlib.error:
            continue
    raise RequestRefused(
        400, f"The request body is not valid {coding} data, as its Content-Encoding says.",
        "invalid_content_encoding",
    )


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    decoder = zlib.decompressobj(wbits)
    out = bytearray()
    data = raw
    while data and len(out) <= limit:
        out += decoder.decompress(data, _DECODE_STEP)
        data = decoder.unconsumed_tail
    if len(out) <= limit:
        out += decoder.flush()
    if len(out) > limit:
        raise RequestRefused(
            413, f"The request body decompresses to more than the gateway's limit of {limit} "
            "bytes (option ccx_max_body_size).", "request_too_large",
        )
    if not decoder.eof or decoder.unused_data:
        raise zlib.error("truncated, or data after the end")
    return bytes(out)
