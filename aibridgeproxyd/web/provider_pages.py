"""The dashboard's Providers and Proxy tokens pages. Reads are open to admins and auditors;
every write is an admin's CSRF-checked form (``pages.EditorForm``) and goes through the
functions the API calls (``management``), then has the daemon reload with it
(``AdminContext.reload_now``).

A refused write shows its form again with the reason and the fields at fault; a typed secret
is never sent back to the browser. A created proxy token is shown in the answer to the POST
only (never in a URL, never again)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from aibridgeproxyd import management
from aibridgeproxyd.management import ManagementError
from aibridgeproxyd.web import flash, provider_form
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.pages import AdminReader, Editor, EditorForm, PageRefused, Viewer, render
from aibridgeproxyd.web.provider_form import FormProblem

router = APIRouter(include_in_schema=False)
Context = Annotated[AdminContext, Depends(context)]


def _problem(exc: ManagementError | FormProblem) -> tuple[str, list[dict[str, str]]]:
    """A refused write as a message (when no single field is at fault) or one
    ``{field, label, detail}`` (``field`` the form's input name, ``label`` what the form calls
    it): each problem is said once."""
    if isinstance(exc, FormProblem):
        field, detail = exc.field, exc.detail
    else:
        field, detail = getattr(exc, "field", ""), str(exc)
    if not field:
        return detail, []
    name = provider_form.input_name(field)
    return "", [{"field": name, "label": provider_form.field_label(field), "detail": detail}]


async def _errors(ctx: AdminContext) -> dict[str, str]:
    """The providers in status error: name -> reason."""
    providers = await management.list_providers(ctx.store)
    return {p["name"]: p["status_reason"] or "" for p in providers if p["status"] == "error"}


async def _saved(
    request: Request, ctx: AdminContext, before: dict[str, str], notice: str, changed: str
) -> Response:
    """After a provider change: reload, then to Providers with ``notice`` and a warning for
    each provider the change left in status error (``changed`` itself if in error, any other
    whose error is new since ``before``)."""
    await ctx.reload_now()
    after = await _errors(ctx)
    warnings = [
        f"Provider {name} is in status error: {reason}"
        for name, reason in after.items()
        if name == changed or before.get(name) != reason
    ]
    return flash.redirect(request, "/providers", notice, warnings)


# --- providers ------------------------------------------------------------------------------


@router.get("/providers")
async def providers_page(request: Request, _viewer: Viewer, ctx: Context) -> Response:
    providers = await management.list_providers(ctx.store)
    return render(request, "providers.html", providers=providers, notice="")


def _new_form(
    request: Request,
    form: dict[str, str],
    status: int = 200,
    error: str = "",
    validations: list[dict[str, str]] | None = None,
) -> Response:
    """The "Add provider" form showing ``form``'s fields as typed (secrets left out)."""
    try:
        fields = provider_form.type_form(form.get("type") or "openai")
    except FormProblem:
        fields = provider_form.type_form("openai")
    blank = {"name": "", "display_name": "", "settings": {}, "api_keys": []}
    return _form_page(
        request,
        status,
        editing=False,
        action="/providers/new",
        form=fields,
        provider=blank,
        values=provider_form.typed_values(form, fields),
        error=error,
        validations=validations or [],
    )


def _form_page(request: Request, status: int, **values: Any) -> Response:
    problems = values.get("validations", [])
    return render(
        request,
        "provider_form.html",
        status=status,
        types=provider_form.provider_types(),
        name_pattern=provider_form.NAME_INPUT_PATTERN,
        invalid={problem["field"] for problem in problems},
        **values,
    )


@router.get("/providers/new")
async def new_provider_page(request: Request, _editor: Editor, type: str = "openai") -> Response:
    return _new_form(request, {"type": type[:64], "enabled": "on", "allow_byok": "on"})


@router.post("/providers/new")
async def add_provider(request: Request, form: EditorForm, ctx: Context) -> Response:
    form = {"enabled": "off", "allow_byok": "off", **form}
    before = await _errors(ctx)
    try:
        created = await management.create_provider(ctx.store, provider_form.new_record(form))
    except (ManagementError, FormProblem) as exc:
        return _new_form(request, form, 400, *_problem(exc))
    name = str(created["name"])
    return await _saved(request, ctx, before, f"Provider {name} added", name)


async def _edit_form(
    request: Request,
    ctx: AdminContext,
    name: str,
    typed: dict[str, str] | None = None,
    problem: tuple[str, list[dict[str, str]]] = ("", []),
) -> Response:
    """The edit form of provider ``name``: its stored values, or for a refused form
    (``typed``) the fields as they were typed (secrets left out), with the ``problem``."""
    try:
        provider = await management.get_provider(ctx.store, name)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    fields = provider_form.type_form(provider["type"])
    values = provider_form.stored_values(provider, fields)
    if typed is not None:
        values = {**values, **provider_form.typed_values(typed, fields), "name": name}
    return _form_page(
        request,
        400 if typed is not None else 200,
        editing=True,
        action=f"/providers/{quote(name, safe='')}/edit",
        form=fields,
        provider=provider,
        values=values,
        error=problem[0],
        validations=problem[1],
    )


@router.get("/providers/{name}/edit")
async def edit_provider_page(
    request: Request, name: str, _editor: Editor, ctx: Context
) -> Response:
    return await _edit_form(request, ctx, name)


@router.post("/providers/{name}/edit")
async def edit_provider(request: Request, name: str, form: EditorForm, ctx: Context) -> Response:
    form = {"enabled": "off", "allow_byok": "off", **form}
    before = await _errors(ctx)
    try:
        current = await management.get_provider(ctx.store, name)
        await management.update_provider(
            ctx.store, name, provider_form.provider_patch(form, current)
        )
    except (ManagementError, FormProblem) as exc:
        return await _edit_form(request, ctx, name, form, _problem(exc))
    return await _saved(request, ctx, before, f"Provider {name} saved", name)


@router.post("/providers/{name}/enabled")
async def switch_provider(request: Request, name: str, form: EditorForm, ctx: Context) -> Response:
    enabled = form.get("enabled") == "on"
    before = await _errors(ctx)
    try:
        await management.set_provider_enabled(ctx.store, name, enabled)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    notice = f"Provider {name} {'enabled' if enabled else 'disabled'}"
    return await _saved(request, ctx, before, notice, name)


@router.get("/providers/{name}/delete")
async def delete_provider_page(
    request: Request, name: str, _editor: Editor, ctx: Context
) -> Response:
    try:
        provider = await management.get_provider(ctx.store, name)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    return render(
        request,
        "confirm.html",
        area="providers",
        title=f"Delete provider {name}",
        question=f"Delete provider {name!r} ({provider['type']})? Its traffic is no "
        "longer intercepted, and its keys are gone for good.",
        action=f"/providers/{quote(name, safe='')}/delete",
        verb="Delete provider",
        back="/providers",
    )


@router.post("/providers/{name}/delete")
async def delete_provider(request: Request, name: str, _form: EditorForm, ctx: Context) -> Response:
    before = await _errors(ctx)
    try:
        await management.delete_provider(ctx.store, name)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    return await _saved(request, ctx, before, f"Provider {name} deleted", name)


# --- proxy tokens ---------------------------------------------------------------------------


async def _tokens_page(
    request: Request, ctx: AdminContext, status: int = 200, **values: Any
) -> Response:
    tokens = await management.list_proxy_tokens(ctx.store)
    values = {"created": None, "notice": "", "error": "", **values}
    return render(request, "tokens.html", status=status, tokens=tokens, **values)


@router.get("/tokens")
async def tokens_page(request: Request, _admin: AdminReader, ctx: Context) -> Response:
    return await _tokens_page(request, ctx)


@router.post("/tokens")
async def create_token(request: Request, form: EditorForm, ctx: Context) -> Response:
    try:
        created = await management.create_proxy_token(ctx.store, form.get("name", "").strip())
    except ManagementError as exc:
        return await _tokens_page(request, ctx, 400, error=str(exc))
    await ctx.reload_now()
    return await _tokens_page(request, ctx, created=created)


@router.get("/tokens/{name}/revoke")
async def revoke_token_page(request: Request, name: str, _editor: Editor, ctx: Context) -> Response:
    if not any(token["name"] == name for token in await management.list_proxy_tokens(ctx.store)):
        raise PageRefused(404, f"no proxy token is named {name!r}")
    return render(
        request,
        "confirm.html",
        area="tokens",
        title=f"Revoke token {name}",
        question=f"Revoke the proxy token of {name!r}? Its new connections are refused.",
        action=f"/tokens/{quote(name, safe='')}/revoke",
        verb="Revoke token",
        back="/tokens",
    )


@router.post("/tokens/{name}/revoke")
async def revoke_token(request: Request, name: str, _form: EditorForm, ctx: Context) -> Response:
    try:
        await management.revoke_proxy_token(ctx.store, name)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    await ctx.reload_now()
    return flash.redirect(request, "/tokens", f"Proxy token {name} revoked", [])
