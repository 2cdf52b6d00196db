"""Reading and dropping request headers in one pass over mitmproxy's fields.

mitmproxy's ``Headers.get``, ``pop`` and ``items`` look a header up by name with a scan of every
field, and raise and catch a ``KeyError`` inside for an absent one (about 2 us each). The request
path asks for several usually absent headers, so it reads them here instead; the results are
what ``Headers`` itself would give.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mitmproxy.http import Headers


def header_values(headers: Mapping[str, str], wanted: Set[str]) -> dict[str, str]:
    """``{lower-case name: value}`` of the headers named in ``wanted`` (lower-case names), as
    ``headers.items()`` gives them: the first spelling of a name wins, and mitmproxy's
    ``Headers`` join a repeated header's values. Only the names are scanned: ``Headers.items()``
    looks every header up again by name (a scan of all of them each time)."""
    fields = getattr(headers, "fields", None)
    names: Iterable[str]
    if fields is not None:  # mitmproxy's Headers: (bytes, bytes) pairs, its own decoding
        names = (name.decode("utf-8", "surrogateescape") for name, _ in fields)
    else:
        names = headers.keys()
    values: dict[str, str] = {}
    for name in names:
        lowered = name.lower()
        if lowered in wanted and lowered not in values:
            values[lowered] = str(headers[name])
    return values


def header(headers: Mapping[str, str], name: str) -> str | None:
    """``headers.get(name)`` (``name`` lower-case), without the ``KeyError`` mitmproxy's
    ``Headers.get`` raises and catches inside for an absent header (about 2 us; the request
    path asks for several usually absent ones: ``content-encoding``, ``upgrade``)."""
    get_all = getattr(headers, "get_all", None)
    if get_all is None:
        return headers.get(name)
    values = get_all(name)
    return ", ".join(values) if values else None


def drop_headers(headers: Headers, names: frozenset[bytes]) -> None:
    """Drop every header whose lower-case name is in ``names``, in one pass over the fields
    (``headers.pop`` scans them all and raises inside for each name that is absent)."""
    kept = tuple(field for field in headers.fields if field[0].lower() not in names)
    if len(kept) != len(headers.fields):
        headers.fields = kept
