"""Parsing of ``Proxy-Authorization`` (section 8): Basic, the token is the password."""

from __future__ import annotations

import base64
import binascii

REALM = "aibridgeproxyd"
CHALLENGE = f'Basic realm="{REALM}"'


def token_from_proxy_authorization(value: str | None) -> str | None:
    """The token carried as the Basic password, or None when missing or malformed.

    The scheme is case-insensitive; the username is ignored; an empty password is no token.
    """
    if not value:
        return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(parts[1], validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    _, sep, password = decoded.partition(":")
    if not sep or not password:
        return None
    return password
