"""The dashboard's record pages: Sessions (filters by initiator, client, provider type and
name, model and time range, read as the data API reads its ``q``; pages of ``PAGE_SIZE``
continued by a keyset cursor, so a page costs the same with 100,000 interceptions as with ten),
one session (threads, prompts, tool calls, thoughts, token usage, cost) and Usage (charts of
tokens and cost by day, provider, model, user and client). Read by admins and auditors alike;
the queries are the store's, the very ones the data API runs."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.clients import CLIENTS
from aibridgeproxyd.model import InterceptionFilter
from aibridgeproxyd.store import RecordError
from aibridgeproxyd.web import charts
from aibridgeproxyd.web.auth import Principal
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.pages import Viewer, render
from aibridgeproxyd.web.problems import ApiError
from aibridgeproxyd.web.record_filters import record_filter

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 25
MAX_PAGE_TRAIL = 20  # earlier pages a "Previous page" link can step back through
# The filters of the Sessions and Usage pages, as query parameters named as the data API's
# ``q`` keys: (parameter, label).
FILTERS = (
    ("initiator", "Initiator"),
    ("client", "Client"),
    ("provider", "Provider type"),
    ("provider_name", "Provider"),
    ("model", "Model"),
    ("started_after", "From"),
    ("started_before", "To"),
)
MAX_FILTER_LENGTH = 200
USAGE_GROUPS = ("day", "provider_name", "provider", "model", "initiator", "client")
# Values offered for the filters that take one of a known set (a browser datalist).
FILTER_CHOICES = {"client": list(CLIENTS), "provider": list(ADAPTERS)}
Context = Annotated[AdminContext, Depends(context)]


def record_query(
    params: Mapping[str, str], viewer: Principal
) -> tuple[InterceptionFilter, dict[str, str]]:
    """The store filter of a page's filter fields (query parameters), read by the data API's
    own ``q`` parser (``record_filters``: the same checks, the same scoping), and the values
    to show back in the form. Raises ``ApiError`` 400 naming the term at fault."""
    shown = {name: params.get(name, "").strip()[:MAX_FILTER_LENGTH] for name, _ in FILTERS}
    q = " ".join(f"{name}:{shlex.quote(value)}" for name, value in shown.items() if value)
    return record_filter(q, viewer), shown


def _link(shown: dict[str, str], after: str = "", back: list[str] | None = None) -> str:
    params: dict[str, Any] = {name: value for name, value in shown.items() if value}
    cursor = {"after": after} if after else {}
    return "/sessions?" + urlencode({**params, **cursor, "back": back or []}, doseq=True)


def pager_links(
    shown: dict[str, str], after: str, back: list[str], last_id: str | None
) -> dict[str, Any]:
    """The Sessions pager: ``first_link``, ``previous_link`` (both "" on the first page) and
    ``next_link`` ("" when ``last_id``, the page's last session when more follow, is None).
    The keyset cursor only goes forward, so each link carries the cursors of the pages before
    it (``back``: "" for the first page), the last ``MAX_PAGE_TRAIL`` of them."""
    back = back[-MAX_PAGE_TRAIL:]
    return {
        "first_link": _link(shown) if after else "",
        "previous_link": _link(shown, back[-1], back[:-1]) if after and back else "",
        "next_link": _link(shown, last_id, [*back, after][-MAX_PAGE_TRAIL:]) if last_id else "",
    }


async def _filters_form(
    ctx: AdminContext, viewer: Principal, shown: dict[str, str]
) -> dict[str, Any]:
    """What the filter form shows: the fields, their values, and the choices offered (the
    models recorded: one bounded DISTINCT query)."""
    models = await ctx.store.list_models(record_filter("", viewer))
    choices = {**FILTER_CHOICES, "model": models}
    return {"filters": FILTERS, "choices": choices, "shown": shown}


def problem_text(exc: ApiError | RecordError) -> str:
    """What the page says of filters it refused: the q parser's details, each naming its field
    by the form's label (``From: invalid timestamp ...``, not ``started_after: ...``)."""
    if not isinstance(exc, ApiError):
        return str(exc)
    details = [detail for _, detail in exc.validations] or [exc.message]
    return "; ".join(_labelled(detail) for detail in details)


def _labelled(detail: str) -> str:
    for name, label in FILTERS:
        if detail.startswith(name + ":"):
            return label + detail[len(name) :]
    return detail


@router.get("/sessions")
async def sessions_page(request: Request, viewer: Viewer, ctx: Context) -> Response:
    params = dict(request.query_params)
    try:
        query, shown = record_query(params, viewer)
        listed = await ctx.store.list_sessions(query, PAGE_SIZE + 1, params.get("after") or None)
    except (ApiError, RecordError) as exc:
        shown = {name: params.get(name, "")[:MAX_FILTER_LENGTH] for name, _ in FILTERS}
        return render(
            request,
            "sessions.html",
            status=400,
            error=problem_text(exc),
            sessions=[],
            count=0,
            **pager_links({}, "", [], None),
            **await _filters_form(ctx, viewer, shown),
        )
    page = listed["sessions"][:PAGE_SIZE]
    more = len(listed["sessions"]) > PAGE_SIZE
    return render(
        request,
        "sessions.html",
        error="",
        sessions=page,
        count=listed["count"],
        **pager_links(
            shown,
            params.get("after", ""),
            request.query_params.getlist("back"),
            page[-1]["id"] if more else None,
        ),
        **await _filters_form(ctx, viewer, shown),
    )


@router.get("/sessions/{session_id:path}")
async def session_page(
    request: Request, session_id: str, _viewer: Viewer, ctx: Context
) -> Response:
    found = await ctx.store.get_session(session_id[:200])
    if found is None:
        return render(request, "error.html", status=404, message=f"no session {session_id!r}")
    return render(request, "session.html", session=found)


TOKEN_KINDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def usage_charts(by: Mapping[str, list[dict[str, Any]]]) -> list[charts.Chart]:
    """The Usage page's charts from usage rows grouped by ``day``, ``provider_name``,
    ``provider`` (the type), ``model``, ``initiator`` and ``client``. Tokens are every token, as
    a policy's ``max_tokens`` counts them: input, output, cache reads and cache writes (a
    record's ``input_tokens`` is the fresh part of the prompt only)."""

    def tokens(row: Mapping[str, Any]) -> int:
        return sum(int(row.get(kind) or 0) for kind in TOKEN_KINDS)

    def cost(row: Mapping[str, Any]) -> int | None:
        micros = row.get("cost_micros")  # null: no record of the group was priced
        return None if micros is None else int(micros)

    days = by.get("day", [])
    made = [
        charts.bar_chart("Tokens per day", days, tokens, charts.tokens_text, vertical=True),
        charts.bar_chart("Cost per day", days, cost, charts.cost_text, vertical=True),
    ]
    for group, title in (
        ("provider_name", "provider"),
        ("provider", "provider type"),
        ("model", "model"),
        ("initiator", "user"),
        ("client", "client"),
    ):
        made.append(
            charts.bar_chart(f"Tokens by {title}", by.get(group, []), tokens, charts.tokens_text)
        )
        made.append(charts.bar_chart(f"Cost by {title}", by.get(group, []), cost, charts.cost_text))
    return made


@router.get("/usage")
async def usage_page(request: Request, viewer: Viewer, ctx: Context) -> Response:
    """The charts of the usage matching the filters: one store query per grouping (each
    bounded by the store's ``MAX_USAGE_GROUPS``), as ``GET /api/v2/aibridge/usage`` reads."""
    params = dict(request.query_params)
    try:
        query, shown = record_query(params, viewer)
        by = {group: await ctx.store.usage(group, query) for group in USAGE_GROUPS}
    except (ApiError, RecordError) as exc:
        shown = {name: params.get(name, "")[:MAX_FILTER_LENGTH] for name, _ in FILTERS}
        return render(
            request,
            "usage.html",
            status=400,
            error=problem_text(exc),
            charts=[],
            **await _filters_form(ctx, viewer, shown),
        )
    return render(
        request,
        "usage.html",
        error="",
        charts=usage_charts(by),
        **await _filters_form(ctx, viewer, shown),
    )
