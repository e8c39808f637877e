"""Upstream content encodings: decoded here, so no answer leaves the gateway compressed
under a header that no longer matches (and scrubbing and judging see plain text).

The gateway asks upstreams for `Accept-Encoding: identity`; some compress anyway. gzip and
deflate are decoded with zlib, bounded; anything else fails the attempt with a message
that names the encoding. Pure: no I/O.
"""

import zlib

# br and zstd would need decoders that can bound their output (brotli 1.1 cannot): they
# are refused rather than risk a decompression bomb in the gateway.
DECODED = ("gzip", "x-gzip", "deflate")
# A transport chunk of a stream that inflates beyond this is a bomb, not an SSE event.
MAX_CHUNK_GROWTH = 16 * 1024 * 1024


class DecodeError(Exception):
    """A body the gateway cannot decode; the message says why (no body bytes)."""


def encodings_of(header: str | None) -> list[str]:
    """The encodings named by a Content-Encoding value, in the order they were applied
    (identity left out)."""
    names = [part.strip().lower() for part in (header or "").split(",")]
    return [n for n in names if n and n != "identity"]


def unsupported_encoding(header: str | None) -> str | None:
    """Why a body with this Content-Encoding cannot be passed on, or None when it can."""
    for name in encodings_of(header):
        if name not in DECODED:
            return (
                f"upstream answered with content-encoding {name!r}, which the gateway does not "
                f"decode (it asks for identity; it decodes {', '.join(DECODED)})"
            )
    return None


class _Inflater:
    """One gzip or deflate layer, fed in pieces; each piece inflates to at most `limit`."""

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._inflate = None if name == "deflate" else zlib.decompressobj(47)

    def feed(self, data: bytes) -> bytes:
        if self._inflate is None:
            # "deflate" is meant to be zlib-wrapped; some servers send raw deflate.
            if len(data) < 2:
                return b"" if not data else self._start_raw(data)
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inflate = zlib.decompressobj(15 if wrapped else -15)
        out = bytearray()
        while data:
            try:
                out += self._inflate.decompress(data, self.limit + 1 - len(out))
            except zlib.error as e:
                raise DecodeError(f"upstream sent an invalid {self.name} body ({e})") from None
            if len(out) > self.limit:
                raise DecodeError(f"upstream's {self.name} body inflates beyond {self.limit} bytes")
            data = self._inflate.unconsumed_tail
            if self._inflate.eof and (data := self._inflate.unused_data):
                # Another gzip member follows (concatenated members are one body).
                self._inflate = zlib.decompressobj(47)
        return bytes(out)

    def _start_raw(self, data: bytes) -> bytes:
        self._inflate = zlib.decompressobj(-15)
        return self.feed(data)

    def end(self) -> bytes:
        if self._inflate is None:
            return b""
        return self._inflate.flush()

    @property
    def complete(self) -> bool:
        return self._inflate is not None and self._inflate.eof


class StreamDecoder:
    """A stream transform (handover.StreamTransform) that decodes a body's content
    encodings chunk by chunk, as the chunks arrive: nothing is held back but what zlib
    needs to finish a block."""

    def __init__(self, header: str | None, limit: int = MAX_CHUNK_GROWTH) -> None:
        if problem := unsupported_encoding(header):
            raise DecodeError(problem)
        # Applied first = decoded last.
        self.layers = [_Inflater(name, limit) for name in reversed(encodings_of(header))]

    def feed(self, chunk: bytes) -> bytes:
        for layer in self.layers:
            chunk = layer.feed(chunk)
        return chunk

    def end(self) -> bytes:
        rest = b""
        for layer in self.layers:
            rest = layer.feed(rest) + layer.end() if rest else layer.end()
        return rest


def decode_body(body: bytes, header: str | None, limit: int) -> bytes:
    """A whole body decoded (at most `limit` bytes), or DecodeError."""
    if not body or not encodings_of(header):
        return body  # an empty body under an encoding header (some proxies' errors) stays empty
    decoder = StreamDecoder(header, limit)
    data = decoder.feed(body) + decoder.end()
    if not all(layer.complete for layer in decoder.layers):
        raise DecodeError("upstream's compressed body ended before its end")
    return data
