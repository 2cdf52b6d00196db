"""``/api/v2/ai/providers`` (CONTRACT section 12, Providers): list, get, create, PATCH, delete
and reload, over the functions the CLI uses (``aibridgeproxyd.management``).

Reads: an ``admin`` or ``auditor`` token (a view never holds a secret). Writes: ``admin`` only.
A proxy token gets 403. Every write answers once the daemon has reloaded with it
(``AdminContext.reload_now``), so the next request routes with it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, ConfigDict, Field

from aibridgeproxyd import management
from aibridgeproxyd.adapters import ADAPTERS
from aibridgeproxyd.model import MAX_KEYS, ProviderRecord
from aibridgeproxyd.web.api_errors import error_responses
from aibridgeproxyd.web.auth import Admin, AuthenticateFirst, Staff
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.patterns import API_KEY, HOST, PROVIDER_NAME

router = APIRouter(prefix="/api/v2/ai/providers", tags=["providers"], route_class=AuthenticateFirst)
Context = Annotated[AdminContext, Depends(context)]

# Far above any real key, URL or name; only there so one field cannot hold the whole 1 MiB.
MAX_TEXT = 4096
MAX_HOSTS = 64
# The schema states what the server accepts (web.patterns), so a client (or schemathesis) can
# rely on it; the server checks again (store.validate_record), with messages naming the problem.
ProviderType = Annotated[str, Field(json_schema_extra={"enum": sorted(ADAPTERS)})]


class ApiKeyView(BaseModel):
    """A stored key as shown: its id (keep it with ``{"id": ...}`` in a PATCH), its masked form
    (at most 4 characters of each end) and when it was added."""

    id: str
    masked: str
    created_at: str


class ProviderView(BaseModel):
    """A provider as the API shows it: ``base_url`` and ``hosts`` as in force (the type's
    defaults applied), the evaluated ``status`` with its reason, keys masked, secret settings
    as ``"***"``."""

    name: str
    type: str
    display_name: str
    enabled: bool
    status: Literal["enabled", "disabled", "error"]
    status_reason: str
    base_url: str
    hosts: list[str]
    allow_byok: bool
    api_keys: list[ApiKeyView]
    settings: dict[str, Any]
    created_at: str
    updated_at: str


class _Input(BaseModel):
    # Unknown fields are refused (a typo must not be ignored); no type coercion ("yes" is not
    # a boolean).
    model_config = ConfigDict(extra="forbid", strict=True)


class NewApiKey(_Input):
    """A key to add."""

    api_key: Annotated[str, Field(max_length=MAX_TEXT, pattern=API_KEY)]


class ApiKeyChange(_Input):
    """One entry of the final key list: ``{"id": ...}`` keeps a stored key, ``{"api_key": ...}``
    adds one."""

    id: Annotated[str | None, Field(max_length=64)] = None
    api_key: Annotated[str | None, Field(max_length=MAX_TEXT, pattern=API_KEY)] = None


Text = Annotated[str, Field(max_length=MAX_TEXT)]
Hosts = Annotated[
    list[Annotated[str, Field(max_length=253, pattern=HOST)]], Field(max_length=MAX_HOSTS)
]


class ProviderCreate(_Input):
    """A new provider. Absent fields take their defaults: the type's base_url and hosts, enabled,
    BYOK allowed, no keys, no settings."""

    name: Annotated[str, Field(max_length=128, pattern=PROVIDER_NAME)]
    type: ProviderType
    display_name: Text = ""
    base_url: Text = ""
    hosts: Hosts = []
    enabled: bool = True
    allow_byok: bool = True
    api_keys: Annotated[list[NewApiKey], Field(max_length=MAX_KEYS)] = []
    settings: dict[str, Any] = {}


class ProviderChanges(_Input):
    """A PATCH: absent (or null) fields stay as they are. ``api_keys`` is the desired final
    list: ``{id}`` keeps a key, ``{api_key}`` adds one, a key not listed is deleted.
    ``settings`` is merged name by name: a value replaces the setting, null removes it, a
    secret sent back as ``"***"`` keeps the stored one."""

    type: ProviderType | None = None
    display_name: Text | None = None
    base_url: Text | None = None
    hosts: Hosts | None = None
    enabled: bool | None = None
    allow_byok: bool | None = None
    api_keys: Annotated[list[ApiKeyChange] | None, Field(max_length=MAX_KEYS)] = None
    settings: dict[str, Any] | None = None


READ_ERRORS = error_responses(401, 403)
WRITE_ERRORS = error_responses(400, 401, 403, 404)


@router.get("", response_model=list[ProviderView], responses=READ_ERRORS)
async def list_providers(_caller: Staff, ctx: Context) -> list[dict[str, Any]]:
    """Every provider, by name."""
    return await management.list_providers(ctx.store)


@router.post(
    "",
    status_code=201,
    response_model=ProviderView,
    responses=error_responses(400, 401, 403, 409),
)
async def create_provider(_caller: Admin, ctx: Context, body: ProviderCreate) -> dict[str, Any]:
    """Create a provider; 409 if the name exists."""
    record = ProviderRecord(
        name=body.name,
        type=body.type,
        display_name=body.display_name,
        base_url=body.base_url,
        hosts=tuple(body.hosts),
        enabled=body.enabled,
        allow_byok=body.allow_byok,
        keys=tuple(key.api_key for key in body.api_keys),
        settings=body.settings,
    )
    view = await management.create_provider(ctx.store, record)
    await ctx.reload_now()
    return view


@router.post("/reload", status_code=202, response_class=Response, responses=READ_ERRORS)
async def reload_providers(_caller: Admin, ctx: Context) -> Response:
    """Rebuild the routing snapshot now (as SIGHUP does)."""
    await ctx.reload_now()
    return Response(status_code=202)


@router.get("/{name}", response_model=ProviderView, responses=error_responses(401, 403, 404))
async def get_provider(name: str, _caller: Staff, ctx: Context) -> dict[str, Any]:
    """One provider."""
    return await management.get_provider(ctx.store, name)


@router.patch("/{name}", response_model=ProviderView, responses=WRITE_ERRORS)
async def update_provider(
    name: str, _caller: Admin, ctx: Context, body: ProviderChanges
) -> dict[str, Any]:
    """Change the fields given."""
    patch = management.ProviderPatch(
        type=body.type,
        display_name=body.display_name,
        base_url=body.base_url,
        hosts=body.hosts,
        enabled=body.enabled,
        allow_byok=body.allow_byok,
        api_keys=None
        if body.api_keys is None
        else [management.KeyChange(id=k.id, api_key=k.api_key) for k in body.api_keys],
        settings=body.settings,
    )
    view = await management.update_provider(ctx.store, name, patch)
    await ctx.reload_now()
    return view


@router.delete(
    "/{name}",
    status_code=204,
    response_class=Response,
    responses=error_responses(401, 403, 404),
)
async def delete_provider(name: str, _caller: Admin, ctx: Context) -> Response:
    """Delete a provider; seeding never brings its name back."""
    await management.delete_provider(ctx.store, name)
    await ctx.reload_now()
    return Response(status_code=204)
