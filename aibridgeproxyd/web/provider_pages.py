"""The dashboard's Providers and Proxy tokens pages. Reads are open to admins and auditors;
every write is an admin's CSRF-checked form (``pages.EditorForm``) and goes through the
functions the API calls (``management``), then asks the daemon to reload at once.

A refused write shows its form again with the reason and the fields at fault; a typed secret
is never sent back to the browser. A created proxy token is shown in the answer to the POST
only (never in a URL, never again)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from aibridgeproxyd import management
from aibridgeproxyd.management import ManagementError
from aibridgeproxyd.web import provider_form
from aibridgeproxyd.web.context import AdminContext, context
from aibridgeproxyd.web.pages import Editor, EditorForm, PageRefused, Viewer, render
from aibridgeproxyd.web.provider_form import FormProblem

router = APIRouter(include_in_schema=False)
Context = Annotated[AdminContext, Depends(context)]


def _problem(exc: ManagementError | FormProblem) -> tuple[str, list[dict[str, str]]]:
    """The message and ``[{field, detail}]`` of a refused write."""
    if isinstance(exc, FormProblem):
        return str(exc), [{"field": exc.field, "detail": exc.detail}]
    field = getattr(exc, "field", "")
    return str(exc), ([{"field": field, "detail": str(exc)}] if field else [])


def _done(location: str) -> Response:
    return RedirectResponse(location, status_code=303)


# --- providers ------------------------------------------------------------------------------


@router.get("/providers")
async def providers_page(request: Request, _viewer: Viewer, ctx: Context) -> Response:
    providers = await management.list_providers(ctx.store)
    return render(request, "providers.html", providers=providers, notice="")


def _blank_provider(form: dict[str, str]) -> dict[str, Any]:
    """What a new provider's form shows (or a refused one's, secrets left out)."""
    return {
        "name": form.get("name", ""),
        "display_name": form.get("display_name", ""),
        "base_url": form.get("base_url", ""),
        "hosts": form.get("hosts", "").split(),
        "enabled": form.get("enabled", "on") == "on",
        "allow_byok": form.get("allow_byok", "on") == "on",
        "api_keys": [],
        "settings": {
            name.removeprefix(provider_form.SETTING_PREFIX): value
            for name, value in form.items()
            if name.startswith(provider_form.SETTING_PREFIX)
        },
    }


def _new_form(
    request: Request,
    form: dict[str, str],
    status: int = 200,
    error: str = "",
    validations: list[dict[str, str]] | None = None,
) -> Response:
    try:
        fields = provider_form.type_form(form.get("type") or "openai")
    except FormProblem:
        fields = provider_form.type_form("openai")
    provider = _blank_provider(form)
    for setting in fields.settings:
        if setting.kind == "secret":
            provider["settings"].pop(setting.name, None)  # never echo a secret
    return render(
        request,
        "provider_form.html",
        status=status,
        editing=False,
        action="/providers/new",
        form=fields,
        provider=provider,
        types=provider_form.provider_types(),
        error=error,
        validations=validations or [],
    )


@router.get("/providers/new")
async def new_provider_page(request: Request, _editor: Editor, type: str = "openai") -> Response:
    return _new_form(request, {"type": type[:64], "enabled": "on", "allow_byok": "on"})


@router.post("/providers/new")
async def add_provider(request: Request, form: EditorForm, ctx: Context) -> Response:
    form = {"enabled": "off", "allow_byok": "off", **form}
    try:
        await management.create_provider(ctx.store, provider_form.new_record(form))
    except (ManagementError, FormProblem) as exc:
        return _new_form(request, form, 400, *_problem(exc))
    ctx.reload_now()
    return _done("/providers")


async def _edit_form(
    request: Request,
    ctx: AdminContext,
    name: str,
    status: int = 200,
    error: str = "",
    validations: list[dict[str, str]] | None = None,
) -> Response:
    try:
        provider = await management.get_provider(ctx.store, name)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    return render(
        request,
        "provider_form.html",
        status=status,
        editing=True,
        action=f"/providers/{quote(name, safe='')}/edit",
        form=provider_form.type_form(provider["type"]),
        provider=provider,
        types=provider_form.provider_types(),
        error=error,
        validations=validations or [],
    )


@router.get("/providers/{name}/edit")
async def edit_provider_page(
    request: Request, name: str, _editor: Editor, ctx: Context
) -> Response:
    return await _edit_form(request, ctx, name)


@router.post("/providers/{name}/edit")
async def edit_provider(request: Request, name: str, form: EditorForm, ctx: Context) -> Response:
    form = {"enabled": "off", "allow_byok": "off", **form}
    try:
        current = await management.get_provider(ctx.store, name)
        await management.update_provider(
            ctx.store, name, provider_form.provider_patch(form, current)
        )
    except (ManagementError, FormProblem) as exc:
        return await _edit_form(request, ctx, name, 400, *_problem(exc))
    ctx.reload_now()
    return _done("/providers")


@router.post("/providers/{name}/enabled")
async def switch_provider(request: Request, name: str, form: EditorForm, ctx: Context) -> Response:
    try:
        await management.set_provider_enabled(ctx.store, name, form.get("enabled") == "on")
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    ctx.reload_now()
    return _done("/providers")


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
    try:
        await management.delete_provider(ctx.store, name)
    except ManagementError as exc:
        raise PageRefused(404, str(exc)) from None
    ctx.reload_now()
    return _done("/providers")


# --- proxy tokens ---------------------------------------------------------------------------


async def _tokens_page(
    request: Request, ctx: AdminContext, status: int = 200, **values: Any
) -> Response:
    tokens = await management.list_proxy_tokens(ctx.store)
    values = {"created": None, "notice": "", "error": "", **values}
    return render(request, "tokens.html", status=status, tokens=tokens, **values)


@router.get("/tokens")
async def tokens_page(request: Request, _viewer: Viewer, ctx: Context) -> Response:
    return await _tokens_page(request, ctx)


@router.post("/tokens")
async def create_token(request: Request, form: EditorForm, ctx: Context) -> Response:
    try:
        created = await management.create_proxy_token(ctx.store, form.get("name", "").strip())
    except ManagementError as exc:
        return await _tokens_page(request, ctx, 400, error=str(exc))
    ctx.reload_now()
    return await _tokens_page(request, ctx, created=created)


@router.get("/tokens/{name}/revoke")
async def revoke_token_page(request: Request, name: str, _editor: Editor) -> Response:
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
    ctx.reload_now()
    return _done("/tokens")
