"""The dashboard's Policies page (docs/policies.md#dashboard): each user's spend against their
budget and the limits in force (``management.budget_reports``), the stored policies, and for an
admin the "Set a policy" form and a delete with a confirmation.

Reads are open to admins and auditors (an auditor sees no form and no delete); every write is
an admin's CSRF-checked form (``pages.EditorForm``) over the functions the API calls
(``management``), then has the daemon reload with it (``AdminContext.reload_now``). A refused
form comes back as typed, with the reason and the field at fault."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from aibridgeproxyd import management
from aibridgeproxyd.management import ManagementError
from aibridgeproxyd.web import flash, policy_form
from aibridgeproxyd.web.context import AdminContext
from aibridgeproxyd.web.pages import Editor, EditorForm, PageRefused, Viewer, render
from aibridgeproxyd.web.provider_form import FormProblem
from aibridgeproxyd.web.provider_pages import Context

router = APIRouter(include_in_schema=False)
# Longer than any user or provider name; a longer query value is cut before it is looked up.
MAX_NAME = 200


def describe(user: str | None, provider: str | None) -> str:
    """How a notice names a policy: ``the default policy``, ``alice's policy at openai``."""
    who = "the default policy" if user is None else f"{user}'s policy"
    return who if provider is None else f"{who} at {provider}"


def _scope(user: str, provider: str) -> tuple[str | None, str | None]:
    """A page's ``user`` and ``provider`` query values as a policy's key (empty or ``*``:
    the default, empty provider: every provider)."""
    user, provider = user[:MAX_NAME].strip(), provider[:MAX_NAME].strip()
    return (None if user in ("", "*") else user), (provider or None)


async def _page(
    request: Request,
    ctx: AdminContext,
    form: dict[str, str],
    status: int = 200,
    problem: tuple[str, str] = ("", ""),
) -> Response:
    """The page, its form showing ``form``; ``problem`` is ``(field, message)`` of a refused
    form (``field`` empty when no single field is at fault)."""
    anonymous = ctx.config.auth == "none"  # requests without a token: the default's only
    reports = await management.budget_reports(ctx.store, anonymous=anonymous)
    return render(
        request,
        "policies.html",
        status=status,
        rows=policy_form.spend_rows(reports),
        policies=await management.list_policies(ctx.store),
        providers=[p.name for p in await ctx.store.list_providers()],
        values=form,
        labels=policy_form.LABELS,
        invalid=problem[0],
        error=problem[1],
        dollars=policy_form.dollars,
        describe=describe,
        query=lambda p: urlencode({"user": p["user"] or "*", "provider": p["provider"] or ""}),
    )


@router.get("/policies")
async def policies_page(
    request: Request, _viewer: Viewer, ctx: Context, user: str = "", provider: str = ""
) -> Response:
    """The page; ``user`` and ``provider`` fill the form with that policy (Edit)."""
    key = _scope(user, provider)
    try:
        stored = await management.get_policy(ctx.store, *key) if user else None
    except ManagementError:
        stored = None
    values = policy_form.form_values(stored)
    if stored is None and user:
        values.update(user=user[:MAX_NAME], provider=provider[:MAX_NAME])
    return await _page(request, ctx, values)


@router.post("/policies")
async def set_policy(request: Request, form: EditorForm, ctx: Context) -> Response:
    """Create or replace the policy the form describes."""
    typed = {name: form.get(name, "") for name in policy_form.FORM_FIELDS}
    try:
        policy = policy_form.policy_from_form(typed)
        _, created = await management.put_policy(ctx.store, policy)
    except FormProblem as exc:
        return await _page(request, ctx, typed, 400, (exc.field, exc.detail))
    except ManagementError as exc:
        return await _page(request, ctx, typed, 400, (exc.field, str(exc)))
    await ctx.reload_now()
    name = describe(policy.user, policy.provider)
    return flash.redirect(request, "/policies", f"{'Added' if created else 'Saved'} {name}", [])


async def _existing(ctx: AdminContext, user: str, provider: str) -> dict[str, Any]:
    try:
        return await management.get_policy(ctx.store, *_scope(user, provider))
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None


@router.get("/policies/delete")
async def delete_policy_page(
    request: Request, _editor: Editor, ctx: Context, user: str = "", provider: str = ""
) -> Response:
    """The confirmation of a delete."""
    policy = await _existing(ctx, user, provider)
    name = describe(policy["user"], policy["provider"])
    query = urlencode({"user": policy["user"] or "*", "provider": policy["provider"] or ""})
    return render(
        request,
        "confirm.html",
        area="policies",
        title=f"Delete {name}",
        question=f"Delete {name}? What it limits falls back to the default policy, or to no "
        "limit when there is none.",
        action=f"/policies/delete?{query}",
        verb="Delete policy",
        back="/policies",
    )


@router.post("/policies/delete")
async def delete_policy(
    request: Request, _form: EditorForm, ctx: Context, user: str = "", provider: str = ""
) -> Response:
    """Delete a policy."""
    policy = await _existing(ctx, user, provider)
    try:
        await management.delete_policy(ctx.store, policy["user"], policy["provider"])
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    await ctx.reload_now()
    name = describe(policy["user"], policy["provider"])
    return flash.redirect(request, "/policies", f"Deleted {name}", [])
