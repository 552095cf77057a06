"""Who is calling: the API key from `Authorization: Bearer` or `x-api-key` (one code path), and
the admin key check. The key itself is never logged, echoed or forwarded; only its id travels on.
"""

from __future__ import annotations

from typing import Iterable

from r1nest import accounts
from r1nest.errors import BadRequest, Unauthorized
from r1nest.keys import digests_equal, hash_key
from r1nest.ledger.base import KeyRecord, Store

MAX_KEY_CHARS = 256
INVALID_KEY_MESSAGE = (
    "Invalid or missing API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`."
)


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key the client presents, or None. Both headers with different keys: 400."""
    found: set[str] = set()
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() != b"bearer":
                raise Unauthorized(INVALID_KEY_MESSAGE)
            found.add(_decode(token))
        elif name == b"x-api-key":
            found.add(_decode(value))
    if len(found) > 1:
        raise BadRequest(
            "Authorization and x-api-key carry different keys; send one key, in either header."
        )
    return found.pop() if found else None


def _decode(value: bytes) -> str:
    value = value.strip()
    if len(value) > MAX_KEY_CHARS:
        raise Unauthorized(INVALID_KEY_MESSAGE)
    return value.decode("latin-1")


async def authenticate(store: Store, headers: Iterable[tuple[bytes, bytes]], *, now: float) -> KeyRecord:
    """The caller's live key record, or 401 (missing, malformed, unknown, revoked, expired alike)."""
    plaintext = presented_key(headers)
    if not plaintext:
        raise Unauthorized(INVALID_KEY_MESSAGE)
    record = await accounts.authenticate(store, plaintext, now=now)
    if record is None:
        raise Unauthorized(INVALID_KEY_MESSAGE)
    return record


class AdminKey:
    """Checks the admin key in constant time; keeps only its digest."""

    def __init__(self, plaintext: str) -> None:
        if not plaintext:
            raise ValueError("empty admin key")
        self._digest = hash_key(plaintext)

    def verify(self, plaintext: str | None) -> bool:
        return bool(plaintext) and digests_equal(hash_key(plaintext), self._digest)  # type: ignore[arg-type]

    def require(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        if not self.verify(presented_key(headers)):
            raise Unauthorized("Invalid or missing admin key.")
