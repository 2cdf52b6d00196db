"""The data API's reads (CONTRACT 12): interceptions, sessions, a session's detail, the
distinct clients and models, and usage, under ``/api/v2/aibridge/`` and again under
``/api/v2/ai-gateway/`` (Coder's two names for it).

Any token may call them: admin and auditor tokens read every user's records, a proxy token its
own only (``record_filters``). Store reads run in the store's thread; a body is validated and
encoded in a worker thread too, so a large page never holds the event loop the proxy's streams
share. A list body stops at ``MAX_PAGE_BYTES`` (fewer items; continue with the cursor).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import TypeAdapter

from aibridgeproxyd.model import InterceptionFilter
from aibridgeproxyd.store import MAX_USAGE_GROUPS, RecordError, StoreError
from aibridgeproxyd.web.auth import Caller
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.problems import ApiError, Problem
from aibridgeproxyd.web.record_filters import FILTER_KEYS, record_filter
from aibridgeproxyd.web.record_models import (
    Interception,
    InterceptionPage,
    Session,
    SessionDetail,
    SessionPage,
    UsageGroup,
)

PREFIXES = ("/api/v2/aibridge", "/api/v2/ai-gateway")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# A list body is cut short past this many bytes of items (each prompt, tool input and thought
# may be up to record_max_bytes; 1,000 of them would be tens of MiB held per request).
MAX_PAGE_BYTES = 8 * 1024 * 1024
GroupBy = Literal["day", "provider", "provider_name", "model", "initiator", "client"]

Context = Annotated[AdminContext, Depends(context)]
Filters = Annotated[
    str,
    Query(
        description="space-separated key:value terms, a value with spaces in double quotes "
        f'(client:"Claude Code"); keys: {", ".join(FILTER_KEYS)}; initiator:me is the '
        "caller; started_after and started_before are RFC 3339",
    ),
]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="at most this many items")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "No such session (for this token)"}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "The database cannot be read"}
}

_routes = APIRouter(responses=_UNAVAILABLE)
_INTERCEPTION = TypeAdapter(Interception)
_SESSION = TypeAdapter(Session)
_SESSION_DETAIL = TypeAdapter(SessionDetail)
_USAGE = TypeAdapter(list[UsageGroup])
_NAMES = TypeAdapter(list[str])


@_routes.get("/interceptions", response_model=InterceptionPage)
async def list_interceptions(
    caller: Caller,
    ctx: Context,
    q: Filters = "",
    limit: Limit = DEFAULT_LIMIT,
    after_id: Annotated[str | None, Query(description="continue after this record")] = None,
) -> Response:
    """Interception records matching ``q``, newest first, with ``count`` of every match."""
    query = record_filter(q, caller, limit)
    page = await _read(ctx.store.page_interceptions(query, after_id), "after_id")
    return await _page(page, "results", _INTERCEPTION)


@_routes.get("/sessions", response_model=SessionPage)
async def list_sessions(
    caller: Caller,
    ctx: Context,
    q: Filters = "",
    limit: Limit = DEFAULT_LIMIT,
    after_session_id: Annotated[str | None, Query(description="continue after it")] = None,
) -> Response:
    """Sessions with a record matching ``q``, most recently active first."""
    query = record_filter(q, caller)
    read = ctx.store.list_sessions(query, limit, after_session_id)
    return await _page(await _read(read, "after_session_id"), "sessions", _SESSION)


@_routes.get("/sessions/{session_id:path}", response_model=SessionDetail, responses=NOT_FOUND)
async def get_session(session_id: str, caller: Caller, ctx: Context) -> Response:
    """One session with its threads; 404 when it does not exist or is another user's."""
    session = await _read(ctx.store.get_session(session_id), "session_id")
    if session is None or not (caller.sees_everyone or session["initiator"] == caller.name):
        raise ApiError(404, f"session {session_id!r} not found")
    return await _encoded(_SESSION_DETAIL, session)


@_routes.get("/clients", response_model=list[str])
async def list_clients(caller: Caller, ctx: Context) -> Response:
    """The distinct clients of the records the caller may see, sorted."""
    names = await _read(ctx.store.list_clients(record_filter("", caller)), "")
    return await _encoded(_NAMES, names)


@_routes.get("/models", response_model=list[str])
async def list_models(caller: Caller, ctx: Context) -> Response:
    """The distinct models of the records the caller may see, sorted (at most 1,000)."""
    names = await _read(ctx.store.list_models(record_filter("", caller)), "")
    return await _encoded(_NAMES, names)


@_routes.get("/usage", response_model=list[UsageGroup])
async def usage(
    caller: Caller, ctx: Context, q: Filters = "", group_by: GroupBy = "day"
) -> Response:
    """Requests, tokens and cost of the records matching ``q``, per ``group_by``: days oldest
    first, other groups by requests, most first; at most 1,000 groups."""
    query: InterceptionFilter = record_filter(q, caller)
    groups = await _read(ctx.store.usage(group_by, query, MAX_USAGE_GROUPS), "group_by")
    return await _encoded(_USAGE, groups)


async def _read[T](read: Awaitable[T], cursor: str) -> T:
    """The store's answer; a ``RecordError`` (an unknown cursor) is a 400 naming ``cursor``,
    any other ``StoreError`` a 503."""
    try:
        return await read
    except RecordError as exc:
        raise ApiError(400, str(exc), validations=[(cursor, str(exc))]) from None
    except StoreError:
        raise ApiError(503, "the database cannot be read; see the daemon's log") from None


async def _encoded(adapter: TypeAdapter[Any], value: Any) -> Response:
    body = await asyncio.to_thread(lambda: adapter.dump_json(adapter.validate_python(value)))
    return _json(body)


async def _page(page: dict[str, Any], key: str, item: TypeAdapter[Any]) -> Response:
    return _json(await asyncio.to_thread(_page_body, page, key, item))


def _page_body(page: dict[str, Any], key: str, item: TypeAdapter[Any]) -> bytes:
    """``{"count": N, key: [...]}`` with the items validated one by one, stopping before the
    one that would take the body past ``MAX_PAGE_BYTES`` (never before the first)."""
    items: list[bytes] = []
    size = 0
    for value in page[key]:
        encoded = item.dump_json(item.validate_python(value))
        size += len(encoded) + 1
        if items and size > MAX_PAGE_BYTES:
            break
        items.append(encoded)
    return b'{"count":%d,"%s":[%s]}' % (page["count"], key.encode(), b",".join(items))


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


router = APIRouter()
for _prefix in PREFIXES:
    router.include_router(_routes, prefix=_prefix, tags=[_prefix.rsplit("/", 1)[-1]])
