"""The data API's ``q`` filter (CONTRACT 12): space-separated ``key:value`` terms, read into an
``InterceptionFilter`` scoped to what the caller may see.

Keys: ``initiator`` (a token name, or ``me``), ``provider`` (the type), ``provider_name``,
``model``, ``client``, ``session_id``, ``started_after``, ``started_before`` (RFC 3339). A value
with spaces is quoted: ``client:"Claude Code"`` (shell-style quoting, as ``shlex`` reads it).
An unknown key, a repeated key, a term without a colon or a bad value is an ``ApiError`` 400
whose validation names ``q`` and the term. Admin and auditor tokens see every user's records; a
proxy token only its own: ``initiator:me`` is implied, and another initiator is a 403.
"""

from __future__ import annotations

import shlex

from aibridgeproxyd.clients import CLIENTS
from aibridgeproxyd.interception.writer import parse_timestamp
from aibridgeproxyd.model import InterceptionFilter
from aibridgeproxyd.web.auth import Principal
from aibridgeproxyd.web.problems import ApiError

FILTER_KEYS = (
    "initiator",
    "provider",
    "provider_name",
    "model",
    "client",
    "session_id",
    "started_after",
    "started_before",
)
# Far longer than any real filter; a longer q is refused before it is parsed.
MAX_QUERY_LENGTH = 4096
# The keys, as the InterceptionFilter field each one sets.
_FIELDS = {key: key for key in FILTER_KEYS} | {"provider": "provider_type"}


def bad_query(detail: str) -> ApiError:
    """A 400 about the ``q`` parameter."""
    return ApiError(400, f"invalid q: {detail}", validations=[("q", detail)])


def parse_terms(q: str) -> dict[str, str]:
    """``{key: value}`` of ``q``. Raises ``ApiError`` 400 naming the term at fault."""
    if len(q) > MAX_QUERY_LENGTH:
        raise bad_query(f"longer than {MAX_QUERY_LENGTH} characters")
    try:
        words = shlex.split(q)
    except ValueError as exc:  # an unbalanced quote
        raise bad_query(f'{exc}: quote a value with spaces as key:"a value"') from None
    terms: dict[str, str] = {}
    for word in words:
        key, colon, value = word.partition(":")
        if not colon:
            raise bad_query(f"term {word!r} is not key:value")
        if key not in _FIELDS:
            raise bad_query(f"unknown key {key!r}; use one of {', '.join(FILTER_KEYS)}")
        if key in terms:
            raise bad_query(f"key {key!r} is given twice")
        terms[key] = _checked_value(key, value)
    return terms


def _checked_value(key: str, value: str) -> str:
    if not value:
        raise bad_query(f"{key}: the value is empty")
    if key == "client" and value not in CLIENTS:
        raise bad_query(f"client {value!r} is not one of {', '.join(CLIENTS)}")
    if key.startswith("started_"):
        try:
            return parse_timestamp(value)
        except (ValueError, OverflowError) as exc:
            raise bad_query(f"{key}: {exc}") from None
    return value


def record_filter(q: str, caller: Principal, limit: int = 100) -> InterceptionFilter:
    """The filter of ``q`` for ``caller``: ``initiator:me`` becomes the caller's name, and a
    proxy token is held to its own records. Raises ``ApiError`` 400 (bad ``q``) or 403 (a
    proxy token asking for another initiator's records)."""
    terms = parse_terms(q)
    if terms.get("initiator") == "me":
        terms["initiator"] = caller.name
    # A proxy token's filter always names its own initiator; asking for another is refused.
    if not caller.sees_everyone and terms.setdefault("initiator", caller.name) != caller.name:
        raise ApiError(403, "a proxy token may read only its own records (initiator:me)")
    fields = {_FIELDS[key]: value for key, value in terms.items()}
    return InterceptionFilter(limit=limit, **fields)
