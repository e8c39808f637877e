"""Pure parts of encodings.py, webauth.py and flowmemory.py (the behaviour is proven
against real mitmdump/mitmweb subprocesses in test_upstream_answers.py, test_mitmweb.py
and test_flow_memory.py)."""

import gzip
import zlib

import pytest

from ccx_addon.encodings import DecodeError, StreamDecoder, decode_body, encodings_of, unsupported_encoding
from ccx_addon.webauth import presented_token, token_matches


def test_encodings_are_listed_in_the_order_applied_and_identity_ignored():
    assert encodings_of("gzip, identity, Deflate") == ["gzip", "deflate"]
    assert encodings_of(None) == [] and encodings_of("identity") == []
    assert unsupported_encoding("gzip, deflate") is None
    assert "'br'" in unsupported_encoding("gzip, br")


def test_layered_and_concatenated_bodies_decode():
    data = b'{"ok": true}'
    assert decode_body(zlib.compress(gzip.compress(data)), "gzip, deflate", 1000) == data
    assert decode_body(gzip.compress(data) + gzip.compress(data), "gzip", 1000) == data + data
    assert decode_body(data, "identity", 1000) == data
    assert decode_body(b"", "gzip", 1000) == b""


def test_truncated_or_oversized_bodies_are_refused():
    with pytest.raises(DecodeError, match="ended before its end"):
        decode_body(gzip.compress(b"x" * 1000)[:-12], "gzip", 10_000)
    with pytest.raises(DecodeError, match="inflates beyond 1000 bytes"):
        decode_body(gzip.compress(b"x" * 5000), "gzip", 1000)
    with pytest.raises(DecodeError, match="inflates beyond"):
        StreamDecoder("gzip", limit=1000).feed(gzip.compress(b"x" * 5000))


def test_web_tokens_come_from_bearer_query_or_cookie_and_compare_exactly():
    assert presented_token("Bearer abc", None, None) == ["abc"]
    assert presented_token("Basic abc", "q", "c") == ["q", "c"]
    assert presented_token(None, None, None) == []
    assert token_matches("secret-token", "secret-token")
    assert not token_matches("secret-tok", "secret-token")
    assert not token_matches("", "") and not token_matches(None, "x")


def test_oldest_flows_are_emptied_first_until_the_rest_fit():
    from ccx_addon.flowmemory import oldest_over_budget

    sizes = [("a", 100), ("b", 0), ("c", 100), ("d", 100)]
    assert oldest_over_budget(sizes, 300) == []
    assert oldest_over_budget(sizes, 250) == ["a"]
    assert oldest_over_budget(sizes, 100) == ["a", "c"]
    assert oldest_over_budget(sizes, 0) == ["a", "c", "d"]
