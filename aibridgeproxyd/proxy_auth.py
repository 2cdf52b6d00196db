"""Proxy authentication decisions: ``Proxy-Authorization: Basic`` with the token as the
password, when a request needs one, and whether a header's token is accepted."""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass

from aibridgeproxyd.auth_failures import AuthFailureTracker
from aibridgeproxyd.snapshot import Snapshot
from aibridgeproxyd.token_refresh import TokenRefresher

# The addon's logger: these lines are about the same proxy authentication.
log = logging.getLogger("aibridgeproxyd.auth")

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


# Failure reasons (the `reason` label of proxy_auth_failures_total).
MISSING = "missing_credentials"
MALFORMED = "malformed_credentials"
INVALID = "invalid_credentials"
COOLDOWN = "too_many_failures"
LOOKUP_FAILED = "token_lookup_failed"


def token_required(auth_mode_token: bool, auth_tunneled: bool, provider_host: bool) -> bool:
    """Whether a CONNECT or plain-HTTP proxy request must carry a valid token: never with auth
    ``none``; with ``token``, always to a provider's host, and to any other host only with
    ``auth_tunneled``."""
    return auth_mode_token and (provider_host or auth_tunneled)


def named_caller(header: str | None, snapshot: Snapshot) -> tuple[str | None, str | None]:
    """``(identity, token)`` of a token in ``header`` the snapshot knows, else ``(None, None)``:
    where no token is needed a valid one still names the caller."""
    token = token_from_proxy_authorization(header)
    identity = snapshot.identity_for_token(token) if token is not None else None
    return (identity, token) if identity is not None else (None, None)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of checking a ``Proxy-Authorization`` header: ``identity`` (the token's
    name) and ``token`` when accepted; else ``reason`` (one of the failure reasons above) and,
    for ``COOLDOWN``, ``retry_after`` seconds."""

    identity: str | None
    token: str | None = None
    reason: str = ""
    retry_after: float = 0.0


async def authenticate(
    header: str | None,
    source: str,
    snapshot: Snapshot,
    failures: AuthFailureTracker,
    refresher: TokenRefresher | None,
) -> Verdict:
    """Check ``header`` from the client address ``source``: the snapshot first (a dict lookup),
    then, unless ``source`` is in its cool-down, one re-read of the store through
    ``refresher``, so a token works the moment it is created. Never raises: a token that
    cannot be checked is refused (``LOOKUP_FAILED``; fails closed)."""
    token = token_from_proxy_authorization(header)
    if token is None:
        return Verdict(None, reason=MISSING if not header else MALFORMED)
    identity = snapshot.identity_for_token(token)
    if identity is not None:
        return Verdict(identity, token)
    cooldown = failures.cooldown_remaining(source)
    if cooldown > 0:
        # No store read for a source that keeps failing.
        return Verdict(None, reason=COOLDOWN, retry_after=cooldown)
    if refresher is not None:
        try:
            identity = await refresher.identity_for_token(token)
        except Exception as exc:
            log.warning("cannot re-read proxy tokens: %s", exc)
            return Verdict(None, reason=LOOKUP_FAILED)
        if identity is not None:
            return Verdict(identity, token)
    return Verdict(None, reason=INVALID)
