"""Parsing of ``Proxy-Authorization`` (section 8): Basic, the token is the password."""

from __future__ import annotations

import base64
import binascii

REALM = "aibridgeproxyd"
CHALLENGE = f'Basic realm="{REALM}"'


def token_from_proxy_authorization(value: str | None) -> str | None:
    """The token carried as the Basic password, or None when missing or malformed.

    The scheme is case-insensitive; the username is ignored; an empty password is no token.
    Never raises: any value that is not well-formed Basic credentials (non-ASCII or invalid
    base64, not UTF-8, no colon) gives None. mitmproxy hands over header bytes that are not
    UTF-8 as surrogate escapes, which ``b64decode`` refuses with a plain ``ValueError``.
    """
    if not value:
        return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(parts[1].encode("ascii"), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None
    _, sep, password = decoded.partition(":")
    if not sep or not password:
        return None
    return password
