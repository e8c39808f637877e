"""Keeping secrets out of everything the gateway shows: flows, logs, error bodies, answers."""

from collections.abc import Iterable

# The fixed text that replaces every credential the flow view would otherwise show.
SECRET_MASK = "[ccx: redacted]"
_MASK_BYTES = SECRET_MASK.encode()


def scrub_bytes(data: bytes, secrets: Iterable[str]) -> bytes:
    """`data` with every secret replaced by the mask (upstream error bodies sometimes echo
    the key they were sent)."""
    for secret in secrets:
        encoded = secret.encode()
        if encoded in data:
            data = data.replace(encoded, _MASK_BYTES)
    return data


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, SECRET_MASK)
    return text


def scrub_headers(headers: Iterable[tuple[str, str]], secrets: Iterable[str]) -> list[tuple[str, str]]:
    """Header pairs with every secret in a value masked (an upstream may echo the key in a
    header, and channel headers such as `api-key` are secrets themselves)."""
    secrets = tuple(secrets)
    return [(name, scrub_text(value, secrets)) for name, value in headers]


def secret_prefix_length(data: bytes, secrets: Iterable[bytes]) -> int:
    """The length of the longest end of `data` that is the start (not the whole) of a
    secret: the part that must wait for the next chunk before it can be let through."""
    longest = 0
    for secret in secrets:
        first = secret[:1]
        # Only the last len(secret) - 1 bytes can start an unfinished secret.
        start = data.rfind(first, max(0, len(data) - len(secret) + 1))
        while start != -1:
            tail = len(data) - start
            if tail > longest and secret.startswith(data[start:]):
                longest = tail
            start = data.rfind(first, max(0, len(data) - len(secret) + 1), start)
    return longest


class StreamScrubber:
    """A stream transform (see handover.StreamTransform) that masks secrets in a body
    arriving in chunks, including a secret split across two chunks. Only an end of a chunk
    that could be the start of a secret waits (until the next chunk or the end of the
    stream); everything else, events included, passes on at once."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self.secrets = sorted({s.encode() for s in secrets if s}, key=len, reverse=True)
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._mask(self.held + chunk)
        keep = secret_prefix_length(data, self.secrets)
        if keep:
            data, self.held = data[:-keep], data[-keep:]
        else:
            self.held = b""
        return data

    def end(self) -> bytes:
        rest, self.held = self.held, b""
        return rest

    def _mask(self, data: bytes) -> bytes:
        for secret in self.secrets:
            if secret in data:
                data = data.replace(secret, _MASK_BYTES)
        return data
