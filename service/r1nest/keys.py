"""API key format and hashing. Pure functions, no I/O.

A key reads `r1n-<id>-<secret>`: `id` (12 lowercase hex) names the key in listings, logs and
the admin API; `secret` (43 url-safe base64 chars, 256 bits) is never stored. The store keeps
`sha256(whole key)` and compares digests in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "r1n"
ADMIN_PREFIX = "r1nadmin"
_KEY_RE = re.compile(r"^(r1n|r1nadmin)-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")


def new_key(prefix: str = KEY_PREFIX) -> tuple[str, str]:
    """A fresh (key_id, plaintext key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{prefix}-{key_id}-{secrets.token_urlsafe(32)}"


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def parse_key_id(plaintext: str) -> str | None:
    """The id part of a well-formed key, or None: a malformed key is simply unknown."""
    match = _KEY_RE.match(plaintext)
    return match.group(2) if match else None


def digests_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))


def mask(plaintext: str) -> str:
    """What may be shown of a key: its id, never its secret."""
    key_id = parse_key_id(plaintext)
    return f"{KEY_PREFIX}-{key_id}-…" if key_id else "…"
