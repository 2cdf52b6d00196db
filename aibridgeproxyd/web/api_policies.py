"""``/api/v2/ai/policies`` (CONTRACT section 15; docs/policies.md#api): policies listed, read,
created, replaced, changed and deleted, and a user's limits in force with the spend counted
against them; ``/api/v2/aibridge/usage/budgets`` (and under ``/api/v2/ai-gateway/``): every
user's spend and remaining budget. All over the functions the CLI and the dashboard use
(``aibridgeproxyd.management``).

Paths. A policy is named by its user and provider: ``/api/v2/ai/policies/{user}`` (every
provider) and ``/api/v2/ai/policies/{user}/providers/{provider}``, where ``{user}`` ``*`` is the
default policy of every user. ``/api/v2/ai/policies/{user}/effective`` is a user's report, and
``me`` there is the caller.

Who: reads of policies need an ``admin`` or ``auditor`` token, writes an ``admin`` token. A
proxy token may read only its own report (``me`` or its own name) and its own budgets; anything
else is a 403. Every write answers once the daemon has reloaded with it
(``AdminContext.reload_now``); the other replicas apply it within a second (the store's
generation tells them).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field, Strict

from aibridgeproxyd import management
from aibridgeproxyd.policy import (
    EVERYONE,
    MAX_COST_USD,
    MAX_LIMIT,
    MAX_MODEL_PATTERNS,
    MAX_PATTERN_LENGTH,
    Policy,
)
from aibridgeproxyd.web.api_errors import error_responses
from aibridgeproxyd.web.auth import Admin, AuthenticateFirst, Caller, Principal, Staff
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.patterns import PROVIDER_NAME as PROVIDER
from aibridgeproxyd.web.patterns import TOKEN_NAME, USER
from aibridgeproxyd.web.problems import ApiError
from aibridgeproxyd.web.records import PREFIXES

PREFIX = "/api/v2/ai/policies"
router = APIRouter(prefix=PREFIX, tags=["policies"], route_class=AuthenticateFirst)
Context = Annotated[AdminContext, Depends(context)]

# The schema says what the server accepts (the server checks again: policy.validate_policy).
UserPath = Annotated[
    str,
    Path(pattern=USER, description="a proxy token's name, or * for the default of every user"),
]
ReportUser = Annotated[str, Path(pattern=TOKEN_NAME, description="a proxy token's name, or me")]
ProviderPath = Annotated[str, Path(pattern=PROVIDER, max_length=128, description="a provider")]
# Lenient on purpose for this one field: a JSON number (12.5) or a decimal string ("12.50").
Cost = Annotated[
    Decimal,
    Strict(False),
    Field(ge=0, le=MAX_COST_USD, decimal_places=6, allow_inf_nan=False),
]
Count = Annotated[int, Field(ge=1, le=MAX_LIMIT)]
Pattern = Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_LENGTH)]
Models = Annotated[list[Pattern], Field(min_length=1, max_length=MAX_MODEL_PATTERNS)]


class PolicyView(BaseModel):
    """A policy as stored (``Policy.to_json``): ``user`` null is the default of every user,
    ``provider`` null every provider; a null limit does not limit. ``max_cost_usd`` is a
    decimal string of US dollars; budgets count per UTC ``period``."""

    user: str | None
    provider: str | None
    max_cost_usd: str | None
    max_tokens: int | None
    period: Literal["day", "week", "month"] | None
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    created_at: str
    updated_at: str


class PolicyLimits(BaseModel):
    """A policy's limits; absent ones do not limit. A budget is ``max_cost_usd`` (US dollars, a
    number or a decimal string, at most 6 decimal places) and/or ``max_tokens`` per
    ``period``; ``models`` are glob patterns of allowed models (``claude-*``)."""

    # Unknown fields are refused (a typo must not be ignored); no coercion but for the cost.
    model_config = ConfigDict(extra="forbid", strict=True)

    max_cost_usd: Cost | None = None
    max_tokens: Annotated[int, Field(ge=0, le=MAX_LIMIT)] | None = None
    period: Literal["day", "week", "month"] | None = None
    models: Models | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    max_parallel: Count | None = None


class PolicyCreate(PolicyLimits):
    """A new policy: ``user`` absent or null for the default of every user, ``provider`` absent
    or null for every provider."""

    user: Annotated[str, Field(pattern=TOKEN_NAME)] | None = None
    provider: Annotated[str, Field(pattern=PROVIDER, max_length=128)] | None = None


class Budget(BaseModel):
    """A budget in force: at most ``max_cost_usd`` (decimal string) and/or ``max_tokens`` per
    UTC ``period``."""

    period: Literal["day", "week", "month"]
    max_cost_usd: str | None
    max_tokens: int | None


class Spend(BaseModel):
    """What the period's budget has counted (every replica's counters, about a second behind):
    ``cost_usd`` and the remaining cost are decimal strings of US dollars; ``fraction_used`` is
    the larger of cost and tokens over their limits (1.0 = used up; may pass 1.0 by what
    requests in flight spent)."""

    period: Literal["day", "week", "month"]
    period_start: str
    period_end: str
    cost_usd: str
    tokens: int
    fraction_used: float
    remaining_cost_usd: str | None
    remaining_tokens: int | None


class MinuteCounts(BaseModel):
    """The current UTC minute's requests and tokens (rpm, tpm)."""

    requests: int
    tokens: int


class Scope(BaseModel):
    """The limits of one scope: ``provider`` null counts all of the user's traffic, a name only
    that provider's. ``sources`` names, for each limit set, the policy it comes from (``user``
    or ``default``). ``spend`` is null without a budget."""

    provider: str | None
    budget: Budget | None
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    sources: dict[str, Literal["user", "default"]]
    this_minute: MinuteCounts
    spend: Spend | None


class UserReport(BaseModel):
    """A user's limits in force and spend; a request must pass every scope. No scope: nothing
    limits the user."""

    user: str
    scopes: list[Scope]


WRITE_ERRORS = error_responses(400, 401, 403, 404)
ITEM_READ = WRITE_ERRORS


@router.get("", response_model=list[PolicyView], responses=error_responses(401, 403))
async def list_policies(_caller: Staff, ctx: Context) -> list[dict[str, Any]]:
    """Every policy: the defaults first, then by user and provider."""
    return await management.list_policies(ctx.store)


@router.post(
    "", status_code=201, response_model=PolicyView, responses=error_responses(400, 401, 403, 409)
)
async def create_policy(_caller: Admin, ctx: Context, body: PolicyCreate) -> dict[str, Any]:
    """Create a policy; 409 when that user and provider have one already."""
    view = await management.create_policy(ctx.store, _policy(body.user, body.provider, body))
    await ctx.reload_now()
    return view


@router.get("/{user}/effective", response_model=UserReport, responses=ITEM_READ)
async def user_report(user: ReportUser, caller: Caller, ctx: Context) -> dict[str, Any]:
    """The limits in force for ``user`` (``me``: the caller) and their spend this period. A
    proxy token may ask for its own only."""
    return await management.user_report(ctx.store, own_user(caller, user))


def own_user(caller: Principal, user: str) -> str:
    """The user ``caller`` asks about: ``me`` is the caller; a proxy token may name no other
    (``ApiError`` 403)."""
    name = caller.name if user == "me" else user
    if not caller.sees_everyone and name != caller.name:
        raise ApiError(403, "a proxy token may read only its own policy (use 'me')")
    return name


def _policy(user: str | None, provider: str | None, limits: PolicyLimits) -> Policy:
    values = limits.model_dump(include=set(management.POLICY_LIMITS))
    if values["models"] is not None:
        values["models"] = tuple(values["models"])
    return Policy(user=user, provider=provider, **values)


def _subject(user: str) -> str | None:
    return None if user == EVERYONE else user


async def _get(ctx: AdminContext, user: str, provider: str | None) -> dict[str, Any]:
    return await management.get_policy(ctx.store, _subject(user), provider)


async def _put(
    ctx: AdminContext, user: str, provider: str | None, body: PolicyLimits, response: Response
) -> dict[str, Any]:
    view, created = await management.put_policy(ctx.store, _policy(_subject(user), provider, body))
    await ctx.reload_now()
    response.status_code = 201 if created else 200
    return view


async def _patch(
    ctx: AdminContext, user: str, provider: str | None, body: PolicyLimits
) -> dict[str, Any]:
    changes = body.model_dump(include=body.model_fields_set)
    view = await management.update_policy(ctx.store, _subject(user), provider, changes)
    await ctx.reload_now()
    return view


async def _delete(ctx: AdminContext, user: str, provider: str | None) -> Response:
    await management.delete_policy(ctx.store, _subject(user), provider)
    await ctx.reload_now()
    return Response(status_code=204)


# --- one policy: /{user} (every provider) and /{user}/providers/{provider} --------------------

PUT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **WRITE_ERRORS,
    201: {"model": PolicyView, "description": "created"},
}
PATCH_DOC = "Change the limits given (null clears one); the others stay."
PUT_DOC = "Create (201) or replace whole (200) the policy; absent limits do not limit."


@router.get("/{user}", response_model=PolicyView, responses=ITEM_READ)
async def get_policy(user: UserPath, _caller: Staff, ctx: Context) -> dict[str, Any]:
    """A user's policy for every provider (``*``: the default policy)."""
    return await _get(ctx, user, None)


@router.put("/{user}", response_model=PolicyView, responses=PUT_RESPONSES, description=PUT_DOC)
async def put_policy(
    user: UserPath, _caller: Admin, ctx: Context, body: PolicyLimits, response: Response
) -> dict[str, Any]:
    """Create or replace a user's policy for every provider."""
    return await _put(ctx, user, None, body, response)


@router.patch("/{user}", response_model=PolicyView, responses=WRITE_ERRORS, description=PATCH_DOC)
async def update_policy(
    user: UserPath, _caller: Admin, ctx: Context, body: PolicyLimits
) -> dict[str, Any]:
    """Change a user's policy for every provider."""
    return await _patch(ctx, user, None, body)


@router.delete("/{user}", status_code=204, response_class=Response, responses=ITEM_READ)
async def delete_policy(user: UserPath, _caller: Admin, ctx: Context) -> Response:
    """Delete a user's policy for every provider; the default applies to them again."""
    return await _delete(ctx, user, None)


@router.get("/{user}/providers/{provider}", response_model=PolicyView, responses=ITEM_READ)
async def get_provider_policy(
    user: UserPath, provider: ProviderPath, _caller: Staff, ctx: Context
) -> dict[str, Any]:
    """A user's policy at one provider (user ``*``: the default there)."""
    return await _get(ctx, user, provider)


@router.put(
    "/{user}/providers/{provider}",
    response_model=PolicyView,
    responses=PUT_RESPONSES,
    description=PUT_DOC,
)
async def put_provider_policy(
    user: UserPath,
    provider: ProviderPath,
    _caller: Admin,
    ctx: Context,
    body: PolicyLimits,
    response: Response,
) -> dict[str, Any]:
    """Create or replace a user's policy at one provider."""
    return await _put(ctx, user, provider, body, response)


@router.patch(
    "/{user}/providers/{provider}",
    response_model=PolicyView,
    responses=WRITE_ERRORS,
    description=PATCH_DOC,
)
async def update_provider_policy(
    user: UserPath, provider: ProviderPath, _caller: Admin, ctx: Context, body: PolicyLimits
) -> dict[str, Any]:
    """Change a user's policy at one provider."""
    return await _patch(ctx, user, provider, body)


@router.delete(
    "/{user}/providers/{provider}", status_code=204, response_class=Response, responses=ITEM_READ
)
async def delete_provider_policy(
    user: UserPath, provider: ProviderPath, _caller: Admin, ctx: Context
) -> Response:
    """Delete a user's policy at one provider."""
    return await _delete(ctx, user, provider)


# --- the usage API's budgets -------------------------------------------------------------------

_usage = APIRouter(route_class=AuthenticateFirst)


@_usage.get("/usage/budgets", response_model=list[UserReport], responses=error_responses(401))
async def budgets(caller: Caller, ctx: Context) -> list[dict[str, Any]]:
    """Each user's limits, spend and remaining budget this period, by name (at most
    ``MAX_REPORTED_USERS``): every user with a proxy token or a policy for an admin or
    auditor token, and with ``auth: none`` last the requests without a token (user ``""``);
    the caller alone for a proxy token."""
    if not caller.sees_everyone:
        return await management.budget_reports(ctx.store, [caller.name])
    return await management.budget_reports(ctx.store, anonymous=ctx.config.auth == "none")


usage_router = APIRouter()
for _prefix in PREFIXES:
    usage_router.include_router(_usage, prefix=_prefix, tags=[_prefix.rsplit("/", 1)[-1]])
