"""Request checks decided from headers, and capped decoding (pure)."""

import gzip
import zlib

import pytest

from ccx_addon.errors import RequestRefused, display_text
from ccx_addon.requestcheck import bad_header, content_encodings, decode_body, header_limits
from ccx_addon.upstream import forwarded_client_header


def test_header_limits():
    fields = tuple((b"x-h%d" % i, b"v") for i in range(101))
    assert header_limits(fields[:100], 100, 65536) is None
    assert header_limits(fields, 100, 65536).status == 431
    assert header_limits(((b"x-big", b"v" * 70000),), 100, 65536).status == 431


@pytest.mark.parametrize("value", [b"a\rb", b"a\x00", b"\x1b[31m", b"a\nb", b"\x7f"])
def test_control_characters_in_headers_are_refused(value):
    refused = bad_header(((b"ok", b"fine\tvalue"), (b"x-a", value)))
    assert refused.status == 400 and refused.code == "invalid_header" and "'x-a'" in refused.message
    assert bad_header(((b"user-agent", b"opencode/1 \xc3\xa9\t"),)) is None


def test_content_encodings():
    assert content_encodings("") == [] and content_encodings("identity") == [] and content_encodings("GZIP") == ["gzip"]
    for header in ("br", "zstd", "x-unknown", "gzip, gzip", "gzip, deflate"):
        with pytest.raises(RequestRefused) as refused:
            content_encodings(header)
        assert refused.value.status == 415 and "gzip, deflate" in refused.value.message


def test_decoding_is_capped_and_checked():
    assert decode_body(gzip.compress(b"hello"), "gzip", 10) == b"hello"
    assert decode_body(zlib.compress(b"hi"), "deflate", 10) == b"hi"
    assert decode_body(zlib.compress(b"hi")[2:-4], "deflate", 10) == b"hi"  # raw deflate
    bomb = gzip.compress(b"0" * (64 * 1024 * 1024))
    with pytest.raises(RequestRefused) as refused:
        decode_body(bomb, "gzip", 1024 * 1024)
    assert refused.value.status == 413
    for bad in (b"not gzip", gzip.compress(b"x" * 100)[:-6], gzip.compress(b"a") + b"trailing"):
        with pytest.raises(RequestRefused) as refused:
            decode_body(bad, "gzip", 1024)
        assert refused.value.status == 400 and refused.value.code == "invalid_content_encoding"


def test_client_header_allowlist():
    for name in ("Content-Type", "accept", "User-Agent", "x-session-id", "X-Session-Affinity", "x-stainless-retry-count"):
        assert forwarded_client_header(name)
    for name in ("cookie", "authorization", "x-api-key", "content-encoding", "connection", "openai-organization", "x-forwarded-for"):
        assert not forwarded_client_header(name)


def test_display_text_escapes_lone_surrogates():
    assert display_text("gpt-5 ☃") == "gpt-5 ☃"
    assert display_text("a\ud800b") == "a\\ud800b"
