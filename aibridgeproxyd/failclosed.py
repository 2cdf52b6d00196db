"""Fail closed: an exception inside one of our addons' hooks refuses, it never lets through.

mitmproxy catches an addon's exception, logs it and carries on with the next addon
(``addonmanager.safecall``). For a check that means "allowed": a proxy-auth parser that raises
has silently accepted the connection. Every addon of ours is therefore wrapped, when the chain is
built (``aibridgeproxyd.chain``), by :func:`guard`, so no addon has to remember it:

- a **check** (it can refuse: auth, classification, destination, routing, policy) that raises
  refuses what the hook was deciding, in the hook's own terms (:func:`refuse`): a CONNECT gets
  ``407`` (auth) / ``403`` (classification, destination) / ``502``; a request on a MITM'd host a
  JSON error in its client's format, a plain-HTTP proxy request what a CONNECT would; a dial gets
  ``data.server.error``; anything that has no answer of its own (TLS, layer choice, a response
  already under way, WebSocket messages) has its flow killed or its client connection closed.
- a **tap** (metrics, recording, tracing, memory housekeeping) that raises only logs: a broken
  usage counter must not break a stream. A tap cannot skip a refusal either way, since every
  addon still runs after it.

Either way the exception is logged once, here, with its traceback for the operator; clients
never see any detail of it.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from mitmproxy import connection, hooks, http, tls
from prometheus_client import Counter

from aibridgeproxyd.errors import error_response, reason_phrase
from aibridgeproxyd.interception.state import (
    mark_proxy_answer,
    request_context,
    stamp_request_id,
)
from aibridgeproxyd.mitm.connections import close_client
from aibridgeproxyd.mitm.hooks import NextLayer, ServerConnectionHookData
from aibridgeproxyd.mitm.responses import proxy_auth_required

log = logging.getLogger("aibridgeproxyd.failclosed")

# Hooks that only report what already happened, or set an addon up: nothing to refuse there.
_LIFECYCLE_HOOKS = frozenset({"load", "configure", "running", "done", "update"})
# Every hook an addon of ours may implement (mitmproxy.hooks.all_hooks is filled lazily).
_FLOW_HOOKS = (
    "http_connect",
    "http_connect_upstream",
    "http_connected",
    "http_connect_error",
    "requestheaders",
    "request",
    "responseheaders",
    "response",
    "error",
    "websocket_start",
    "websocket_message",
    "websocket_end",
    "tcp_start",
    "tcp_message",
    "tcp_end",
    "tcp_error",
)
_CONNECTION_HOOKS = (
    "client_connected",
    "client_disconnected",
    "server_connect",
    "server_connected",
    "server_disconnected",
    "server_connect_error",
    "next_layer",
    "tls_clienthello",
    "tls_start_client",
    "tls_start_server",
    "tls_established_client",
    "tls_established_server",
    "tls_failed_client",
    "tls_failed_server",
)
HOOKS = _FLOW_HOOKS + _CONNECTION_HOOKS


def _all_hook_names() -> tuple[str, ...]:
    """HOOKS, plus any hook mitmproxy defines that is not listed there (DNS, QUIC, SOCKS, a
    newer version's), so no hook of ours ever runs unguarded."""
    known = set(HOOKS) | _LIFECYCLE_HOOKS
    return HOOKS + tuple(sorted(set(hooks.all_hooks) - known))


# Hooks that fire after the fact: a check raising there has nothing left to refuse.
_AFTER_THE_FACT = frozenset(
    {
        "error",
        "client_disconnected",
        "server_disconnected",
        "server_connect_error",
        "tls_failed_client",
        "tls_failed_server",
        "tcp_end",
        "tcp_error",
        "websocket_end",
        "dns_error",
        "udp_end",
        "udp_error",
    }
)

# The error a refused dial carries; clients see 502 (or their format's JSON), never this text.
DIAL_REFUSED = "refused: internal error in a check"
INTERNAL_ERROR_MESSAGE = "The proxy could not check this request; it was refused."


class Role(StrEnum):
    """What an exception in a guarded addon's hook leads to."""

    CHECK = "check"  # can refuse: an exception refuses
    TAP = "tap"  # observes: an exception is logged and the traffic carries on


# Addons that only observe. Any other addon of ours is a check: a new addon fails closed unless
# it is listed here on purpose.
TAPS = frozenset(
    {
        "InFlight",
        "Running",
        "LeafRenewal",
        "MemoryHousekeeping",
        "StallWatch",
        "RequestMetrics",
        "RecordInterceptions",
        "CountPolicySpend",
        "TraceRequests",
        "ForgetWebSocketMessages",
    }
)
# What a CONNECT gets when the check deciding it raises; 502 for any other check.
CONNECT_STATUS = {"ProxyAuth": 407, "Classify": 403, "DestinationGuard": 403}


def guard_chain(master: Any, failures: Counter | None = None) -> None:
    """Wrap, in place, every addon of ours in ``master``'s chain (mitmproxy's own are left as
    they are). Call it once the chain is complete: hooks run in chain order, and the wrapper
    keeps each addon's place. ``addons.get(name)`` still returns the addon itself.
    ``failures`` (labels ``addon``, ``hook``, ``role``) counts the exceptions caught."""
    chain = master.addons.chain
    for index, addon in enumerate(chain):
        if isinstance(addon, _Guarded) or type(addon).__module__.startswith("mitmproxy."):
            continue
        kind = type(addon).__name__
        role = Role.TAP if kind in TAPS else Role.CHECK
        chain[index] = guard(addon, role, CONNECT_STATUS.get(kind, 502), failures)


def guard(
    addon: Any,
    role: Role = Role.CHECK,
    connect_status: int = 502,
    failures: Counter | None = None,
) -> Any:
    """``addon`` wrapped so that an exception in any of its hooks fails closed (``Role.CHECK``)
    or is only logged (``Role.TAP``). ``connect_status`` is the status a CONNECT or a
    plain-HTTP proxy request gets when this addon raises deciding it (407 for auth, 403 for
    classification and destinations, else 502).

    The wrapper carries the addon's mitmproxy name, so ``addons.get(name)`` still finds it, and
    its hooks; nothing else of the addon is read through it."""
    return _Guarded(addon, role, connect_status, failures)


class _Guarded:
    def __init__(
        self, addon: Any, role: Role, connect_status: int, failures: Counter | None
    ) -> None:
        self._addon = addon
        self.name = getattr(addon, "name", type(addon).__name__.lower())
        self.role, self.connect_status = role, connect_status
        self._hooks = frozenset(_all_hook_names())
        # Every hook name is set on the instance: the wrapped method, or None for a hook the
        # addon does not implement (mitmproxy skips a falsy handler). mitmproxy looks every hook
        # name up on every addon for every event, on the request path: an attribute that is set
        # is the cheapest answer.
        for hook in self._hooks:
            method = getattr(addon, hook, None)
            if callable(method):
                setattr(self, hook, _wrap(addon, hook, method, role, connect_status, failures))
            else:
                setattr(self, hook, None)
        for hook in _LIFECYCLE_HOOKS:
            method = getattr(addon, hook, None)
            setattr(self, hook, method if callable(method) else None)
        # No ``__getattr__`` forwarding to the addon: mitmproxy asks every addon for ``addons``
        # on every event (``traverse``), and a plain missing attribute is the cheapest "no".
        if hasattr(addon, "addons"):
            self.addons = addon.addons

    def __repr__(self) -> str:
        return f"guard({self._addon!r})"


def _wrap(
    addon: Any,
    hook: str,
    method: Callable[..., Any],
    role: Role,
    connect_status: int,
    failures: Counter | None,
) -> Callable[..., Any]:
    owner = type(addon).__name__
    # The traceback is logged the first time each kind of exception happens here; repeats (a
    # client sending the same bad input in a loop) get one line each, without it.
    seen: set[type[BaseException]] = set()

    def failed(args: tuple[Any, ...], exc: BaseException) -> None:
        refusing = role is Role.CHECK and hook not in _AFTER_THE_FACT
        first = type(exc) not in seen
        if first and len(seen) < 100:
            seen.add(type(exc))
        log.error(
            "%s.%s raised %s; %s",
            owner,
            hook,
            type(exc).__name__,
            "refused (fail closed)" if refusing else "carrying on",
            exc_info=exc if first else None,
            extra={"addon": owner, "hook": hook},
        )
        if failures is not None:
            failures.labels(owner, hook, role.value).inc()
        if refusing:
            try:
                refuse(hook, args[0] if args else None, connect_status)
            except Exception:  # pragma: no cover - the refusal itself must not escape
                log.exception("refusing after %s.%s failed", owner, hook)

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def guarded_async(*args: Any) -> None:
            try:
                await method(*args)
            except Exception as exc:
                failed(args, exc)

        return guarded_async

    @functools.wraps(method)
    def guarded(*args: Any) -> Awaitable[None] | None:
        try:
            result = method(*args)
        except Exception as exc:
            failed(args, exc)
            return None
        if result is not None and inspect.isawaitable(result):  # a sync method handing back one
            return _await_guarded(result, failed, args)
        return result

    return guarded


async def _await_guarded(
    awaitable: Any, failed: Callable[[tuple[Any, ...], BaseException], None], args: tuple[Any, ...]
) -> None:
    try:
        await awaitable
    except Exception as exc:
        failed(args, exc)


def refuse(hook: str, subject: Any, connect_status: int = 502) -> None:
    """Refuse what ``hook`` was deciding about ``subject`` (its first argument)."""
    if isinstance(subject, http.HTTPFlow):
        _refuse_flow(hook, subject, connect_status)
    elif isinstance(subject, ServerConnectionHookData):
        if hook == "server_connect":
            subject.server.error = DIAL_REFUSED
        else:
            close_client(subject.client)
    elif isinstance(subject, tls.ClientHelloData):
        # Never dial the original host to mirror its TLS, never relay: just close.
        subject.ignore_connection = False
        subject.establish_server_tls_first = False
        close_client(subject.context.client)
    elif isinstance(subject, tls.TlsData):
        close_client(subject.context.client)
    elif isinstance(subject, NextLayer):
        # No layer at all: the connection buffers until it is closed, nothing is relayed.
        subject.layer = None
        close_client(subject.context.client)
    elif isinstance(subject, connection.Client):
        # mitmproxy's documented way to refuse in client_connected.
        subject.error = DIAL_REFUSED
        close_client(subject)
    elif getattr(subject, "kill", None) is not None and getattr(subject, "killable", False):
        subject.kill()  # a TCP flow


def _refuse_flow(hook: str, flow: http.HTTPFlow, connect_status: int) -> None:
    if hook in ("http_connect", "http_connect_upstream"):
        flow.response = _plain_response(connect_status)
        return
    if hook == "http_connect_error":
        # The refusal stands; only its body is replaced, since the check that raised may have
        # been about to take internal detail (an address, an OS error) out of it.
        status = flow.response.status_code if flow.response is not None else 502
        flow.response = _plain_response(status if status >= 400 else 502)
        return
    if hook == "http_connected":
        # The tunnel is already answered 200; nothing on it may be relayed or intercepted.
        close_client(flow.client_conn)
        return
    if hook in ("requestheaders", "request"):
        # On a MITM'd host: a JSON error in the client's format. A plain-HTTP proxy request
        # gets what a CONNECT would (407 from auth, 403 from a destination check).
        if request_context(flow) is not None:
            flow.response = _error_response(flow, 502)
        else:
            flow.response = _plain_response(connect_status)
        return
    if hook == "response" and flow.response is not None and not flow.response.stream:
        # Buffered: the client has seen nothing yet, so it gets an error in its format.
        flow.response = _error_response(flow, 502)
        return
    # The response is under way (or this is a WebSocket message): all that is left is to cut.
    # The cut is the proxy's doing: recorded with its code and no TTFB, not as the upstream's
    # answer (no-op on a flow the proxy does not route).
    mark_proxy_answer(flow, "internal_error")
    if flow.killable:
        flow.kill()
    else:
        close_client(flow.client_conn)


def _plain_response(status: int) -> http.Response:
    if status == 407:
        return proxy_auth_required()  # the addon's own answer, challenge included
    return http.Response.make(
        status,
        reason_phrase(status).encode(),
        {"Content-Type": "text/plain", "Connection": "close", "Proxy-Connection": "close"},
    )


def _error_response(flow: http.HTTPFlow, status: int) -> http.Response:
    ctx = request_context(flow)
    if ctx is None:
        return _plain_response(status)
    try:
        api_format = ctx.adapter.error_format(flow.request)
    except Exception:
        return _plain_response(status)
    response = error_response(api_format, status, INTERNAL_ERROR_MESSAGE, "internal_error")
    stamp_request_id(response, ctx)
    # The proxy's own answer: recorded with this code and no TTFB, never logged or measured as
    # the upstream's (the check may fail after the upstream's headers were already seen).
    mark_proxy_answer(flow, "internal_error")
    return response
