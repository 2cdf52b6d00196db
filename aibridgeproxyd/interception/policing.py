"""Policy enforcement on the request path (docs/policies.md#enforcement): the check made before a
request is routed, and the spend counted once its response ended.

``enforce_policy`` resolves the caller's policies from the snapshot (no database query), reads
the model the request asks for, and asks the replica's ``PolicyCounters`` to admit it: a
``PolicyHold`` (kept on the flow until the response ended) or a ``Refusal`` in the
contract's terms (403 ``budget_exceeded`` / ``model_not_allowed``, 429 with ``Retry-After``).
It fails closed: an exception while checking refuses (``policy_error``). ``count_spend`` adds
the finished response's tokens and cost to every scope the request counted in.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from urllib.parse import unquote

from mitmproxy import http

from aibridgeproxyd.adapters.base import decoded_request_body, query_model
from aibridgeproxyd.interception.recording import read_request_model
from aibridgeproxyd.interception.routing import Refusal
from aibridgeproxyd.interception.state import RequestContext
from aibridgeproxyd.policy import EffectivePolicy, PolicyIndex, model_allowed, resolve
from aibridgeproxyd.policy_counters import (
    Admission,
    PolicyCounters,
    PolicyRefusal,
    model_refusal,
    tokens_of,
)
from aibridgeproxyd.usage import ApiKind

log = logging.getLogger("aibridgeproxyd.policy")

# flow.metadata key of a request's PolicyHold.
POLICY_HOLD_KEY = "aibridgeproxyd.policy_hold"
# Methods whose requests may carry no model without being refused by an allow-list: they read
# (a model list, a file) or end something; a request that creates work names its model.
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


@dataclass
class PolicyHold:
    """An admitted request's policy state: what applied (for counting its spend), its
    ``max_parallel`` slots (``admission``; released when the flow leaves flight), and whether
    its spend was counted already."""

    effective: EffectivePolicy
    admission: Admission
    counted: bool = False


def enforce_policy(
    ctx: RequestContext, request: http.Request, policies: PolicyIndex, counters: PolicyCounters
) -> PolicyHold | Refusal:
    """Admit the whole ``request`` of ``ctx`` under the caller's policies at its provider, or
    refuse it. A request without a proxy token (``auth: none``) falls under the default
    policies only (user ``""``). Never raises: an exception refuses with 500 ``policy_error``
    (logged with its traceback)."""
    try:
        read_request_model(ctx, request)  # the whole request, before the adapter's rewrite
        effective = resolve(policies, ctx.connect.identity or "", ctx.provider.name)
        # A WebSocket upgrade is a GET that opens a whole session of work (Realtime, Gemini
        # Live): under an allow-list it must name its model (``?model=``) like a POST.
        needs_model = request.method not in _READ_METHODS or _upgrades(request)
        stray = _unallowed_model(ctx, request, effective, needs_model)
        verdict = (
            counters.admit(effective, ctx.recording.request_model, needs_model)
            if stray is None
            else model_refusal(stray)
        )
    except Exception:
        log.exception("policy check failed; refusing the request", extra=ctx.log_ids())
        return Refusal(500, "The proxy could not check its policies; retry later.", "policy_error")
    if isinstance(verdict, PolicyRefusal):
        return policy_refusal(verdict)
    return PolicyHold(effective, verdict)


# Streams whose usage the client must ask for (OpenAI's chat and legacy completions API
# reference: ``stream_options.include_usage``); other APIs always report it.
_USAGE_ON_REQUEST = frozenset({ApiKind.OPENAI_CHAT_COMPLETIONS, ApiKind.OPENAI_COMPLETIONS})


def ask_for_stream_usage(ctx: RequestContext, request: http.Request, hold: PolicyHold) -> bool:
    """For a user under a budget or a tpm limit, make an OpenAI-format stream report its usage:
    ``stream_options.include_usage`` set (the client's other stream options kept). Without it
    such a stream reports no tokens, and would spend nothing against the limit. The stream then
    ends with the usage chunk the API defines (``choices`` empty). True when the body changed.
    Raises ``ValueError`` for a body that cannot be decoded (``adapters.base.UndecodableBody``,
    ``DecodedBodyTooLarge``) or re-encoded (the caller logs it)."""
    if ctx.recording.api_kind not in _USAGE_ON_REQUEST or not any(
        scope.budget is not None or scope.tpm is not None for scope in hold.effective.scopes
    ):
        return False
    # Bounded: mitmproxy's get_content would decode a few kilobytes of zstd to gigabytes.
    raw = decoded_request_body(request)
    if b'"stream"' not in raw:
        return False
    try:
        body = json.loads(raw)
    except ValueError:
        return False  # not JSON: the upstream answers it, and no usage is read either way
    options = body.get("stream_options") if isinstance(body, dict) else None
    if not isinstance(body, dict) or body.get("stream") is not True:
        return False
    if options is not None and (not isinstance(options, dict) or options.get("include_usage")):
        return False
    body["stream_options"] = {**(options or {}), "include_usage": True}
    request.content = json.dumps(body, ensure_ascii=False).encode()
    return True


def _upgrades(request: http.Request) -> bool:
    return request.headers.get("upgrade", "").strip().lower() == "websocket"


def _unallowed_model(
    ctx: RequestContext, request: http.Request, effective: EffectivePolicy, needs_model: bool
) -> str | None:
    """Under a model allow-list, a model the request names anywhere that the list refuses
    (the adapter's reading is checked by the counters; this covers the rest), or None. The
    check and the provider must see the same model, so every place one may be named counts:
    each top-level ``model`` of the body parsed whole (a duplicate key, an escaped key), the
    ``?model=`` of the URL, and for a request that creates work a deployment or model named in
    the path (Azure ``/deployments/<name>/``, Gemini ``/models/<name>:<method>``)."""
    if not any(scope.models is not None for scope in effective.scopes):
        return None
    named = _body_models(request) | _path_models(request, needs_model)
    query = query_model(request)
    if query:
        named.add(query)
    for model in sorted(named):
        if not model_allowed(effective.scopes, model):
            return model
    return None


def _body_models(request: http.Request) -> set[str]:
    """Every top-level ``model`` of a JSON object body (several when the key is repeated, each
    as the provider's parser could take it)."""
    outermost: list[list[tuple[str, object]]] = [[]]

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        outermost[0] = items  # objects finish inside out: the last one is the body itself
        return dict(items)

    try:
        raw = decoded_request_body(request) or b""
        if not raw.lstrip().startswith(b"{"):
            return set()
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return set()
    return {str(value) for key, value in outermost[0] if key == "model"}


_PATH_MODEL = re.compile(r"/(?:deployments|models|tunedModels)/([^/?:]+)")


def _path_models(request: http.Request, needs_model: bool) -> set[str]:
    if not needs_model:
        return set()
    path = unquote(request.path.split("?", 1)[0])
    return {match.group(1) for match in _PATH_MODEL.finditer(path)}


def policy_refusal(verdict: PolicyRefusal) -> Refusal:
    """A counters' refusal as the route's ``Refusal``: ``Retry-After`` on a 429."""
    headers = {} if verdict.retry_after is None else {"Retry-After": str(verdict.retry_after)}
    return Refusal(verdict.status, verdict.message, verdict.code, headers)


def count_spend(
    hold: PolicyHold, ctx: RequestContext, cost_micros: int | None, counters: PolicyCounters
) -> None:
    """Count the finished request's tokens (``ctx.recording.usage``) and cost (millionths of a
    USD; None: unpriced, counted as 0) once, whichever hooks call it."""
    if hold.counted:
        return
    hold.counted = True
    usage = ctx.recording.usage
    tokens = 0 if usage is None else tokens_of(usage)
    counters.record(hold.effective, tokens, cost_micros or 0)
