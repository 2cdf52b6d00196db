"""The admin application: ``build_app`` assembles the operational endpoints (``/metrics``,
``/healthz``, ``/readyz``, ``/ca-cert.pem``; unauthenticated), the API routers under ``/api/``
and the dashboard into one FastAPI application with the contract's error shape.

The OpenAPI 3 document is served at ``/api/v2/openapi.json`` (CONTRACT section 12).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import Response

from aibridgeproxyd import __version__
from aibridgeproxyd.web import (
    api_policies,
    api_providers,
    api_tokens,
    dashboard,
    openapi,
    problems,
    records,
)
from aibridgeproxyd.web.body_limit import BodyLimit
from aibridgeproxyd.web.context import AdminContext

OPENAPI_PATH = "/api/v2/openapi.json"


@dataclass(frozen=True)
class Reply:
    """What an operational endpoint answers: status, body and headers."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[tuple[str, str], ...] = ()


# An operational endpoint returns its reply, or an awaitable of it (work kept off the loop).
Route = Callable[[], Reply | Awaitable[Reply]]


def build_app(ops: Mapping[str, Route], ctx: AdminContext) -> FastAPI:
    """The application: ``ops`` by path (GET and HEAD), and the API and dashboard on ``ctx``."""
    app = FastAPI(
        title="aibridgeproxyd",
        version=__version__,
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = ctx
    problems.install(app)
    for path, route in ops.items():
        app.add_api_route(
            path, _ops_endpoint(route), methods=["GET", "HEAD"], include_in_schema=False
        )
    app.include_router(api_providers.router)
    app.include_router(api_tokens.router)
    app.include_router(records.router)
    app.include_router(api_policies.router)
    app.include_router(api_policies.usage_router)
    openapi.install(app)
    dashboard.install(app)
    app.add_middleware(BodyLimit)
    return app


def _ops_endpoint(route: Route) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        reply = route()
        if inspect.isawaitable(reply):
            reply = await reply
        headers = {"Cache-Control": "no-store", **dict(reply.extra_headers)}
        return Response(reply.body, reply.status, headers, media_type=reply.content_type)

    return endpoint
