"""The dashboard's record pages: Sessions (filters by initiator, client, provider type, model
and time range; pages of ``PAGE_SIZE`` continued by a keyset cursor, so a page costs the same
with 100,000 interceptions as with ten), one session (threads, prompts, tool calls, thoughts,
token usage, cost) and Usage (charts of tokens and cost by day, provider, model, user and
client). Read by admins and auditors alike; the queries are the store's, as the API's are."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.clients import CLIENTS
from aibridgeproxyd.interception.writer import parse_timestamp
from aibridgeproxyd.model import InterceptionFilter
from aibridgeproxyd.store import RecordError
from aibridgeproxyd.web import charts
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.pages import Viewer, render

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 25
# The session filters, as query parameters of the Sessions page: (parameter, label).
SESSION_FILTERS = (
    ("initiator", "Initiator"),
    ("client", "Client"),
    ("provider", "Provider type"),
    ("model", "Model"),
    ("started_after", "From"),
    ("started_before", "To"),
)
# Values offered for the filters that take one of a known set (a browser datalist).
FILTER_CHOICES = {"client": list(CLIENTS), "provider": list(ADAPTERS)}
Context = Annotated[AdminContext, Depends(context)]


def session_filter(params: Mapping[str, str]) -> tuple[InterceptionFilter, dict[str, str]]:
    """The store filter of the Sessions page's query parameters, and the values to show back
    in the form. Raises ``ValueError`` naming the field for a malformed time."""
    shown = {name: params.get(name, "").strip()[:200] for name, _ in SESSION_FILTERS}
    times: dict[str, str | None] = {}
    for name in ("started_after", "started_before"):
        try:
            times[name] = parse_timestamp(shown[name]) if shown[name] else None
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    query = InterceptionFilter(
        initiator=shown["initiator"] or None,
        client=shown["client"] or None,
        provider=shown["provider"] or None,
        model=shown["model"] or None,
        started_after=times["started_after"],
        started_before=times["started_before"],
    )
    return query, shown


def _link(shown: dict[str, str], after: str | None = None) -> str:
    params = {name: value for name, value in shown.items() if value}
    return "/sessions?" + urlencode({**params, **({"after": after} if after else {})})


@router.get("/sessions")
async def sessions_page(request: Request, _viewer: Viewer, ctx: Context) -> Response:
    params = dict(request.query_params)
    try:
        query, shown = session_filter(params)
        listed = await ctx.store.list_sessions(query, PAGE_SIZE + 1, params.get("after") or None)
    except (ValueError, RecordError) as exc:
        shown = {name: params.get(name, "")[:200] for name, _ in SESSION_FILTERS}
        return render(
            request,
            "sessions.html",
            status=400,
            error=str(exc),
            filters=SESSION_FILTERS,
            choices=FILTER_CHOICES,
            shown=shown,
            sessions=[],
            count=0,
            next_link="",
            paged=False,
        )
    page = listed["sessions"][:PAGE_SIZE]
    more = len(listed["sessions"]) > PAGE_SIZE
    return render(
        request,
        "sessions.html",
        error="",
        filters=SESSION_FILTERS,
        choices=FILTER_CHOICES,
        shown=shown,
        sessions=page,
        count=listed["count"],
        next_link=_link(shown, page[-1]["id"]) if more else "",
        first_link=_link(shown),
        paged=bool(params.get("after")),
    )


@router.get("/sessions/{session_id}")
async def session_page(
    request: Request, session_id: str, _viewer: Viewer, ctx: Context
) -> Response:
    found = await ctx.store.get_session(session_id[:200])
    if found is None:
        return render(request, "error.html", status=404, message=f"no session {session_id!r}")
    return render(request, "session.html", session=found)


def usage_charts(by: Mapping[str, list[dict[str, Any]]]) -> list[charts.Chart]:
    """The Usage page's charts from usage rows grouped by ``day``, ``provider``, ``model``,
    ``initiator`` and ``client``."""

    def tokens(row: Mapping[str, Any]) -> int:
        return int(row.get("input_tokens") or 0) + int(row.get("output_tokens") or 0)

    def cost(row: Mapping[str, Any]) -> int:
        return int(row.get("cost_micros") or 0)

    days = by.get("day", [])
    made = [
        charts.bar_chart("Tokens per day", days, tokens, charts.tokens_text, vertical=True),
        charts.bar_chart("Cost per day", days, cost, charts.cost_text, vertical=True),
    ]
    for group, title in (
        ("provider", "provider"),
        ("model", "model"),
        ("initiator", "user"),
        ("client", "client"),
    ):
        made.append(
            charts.bar_chart(f"Tokens by {title}", by.get(group, []), tokens, charts.tokens_text)
        )
        made.append(charts.bar_chart(f"Cost by {title}", by.get(group, []), cost, charts.cost_text))
    return made
