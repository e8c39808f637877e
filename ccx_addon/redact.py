"""Keeping secrets out of everything the gateway shows: flows, logs, error bodies."""

from collections.abc import Iterable

# The fixed text that replaces every credential the flow view would otherwise show.
SECRET_MASK = "[ccx: redacted]"


def scrub_bytes(data: bytes, secrets: Iterable[str]) -> bytes:
    """`data` with every secret replaced by the mask (upstream error bodies sometimes echo
    the key they were sent)."""
    for secret in secrets:
        encoded = secret.encode()
        if encoded in data:
            data = data.replace(encoded, SECRET_MASK.encode())
    return data


def scrub_text(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, SECRET_MASK)
    return text
