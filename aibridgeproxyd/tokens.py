"""Proxy tokens: generated here, shown once, stored only as a hash."""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "abp_"


def generate_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a fast unsalted hash is enough: there is nothing to
    # brute-force, and it keeps the per-CONNECT check an O(1) dict lookup.
    return hashlib.sha256(token.encode()).hexdigest()
