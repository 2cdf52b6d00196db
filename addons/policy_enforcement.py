"""Enforce policies (docs/policies.md) on each MITM'd request before it is routed: budgets,
model allow-lists, rpm, tpm and max_parallel, from in-memory counters (no database query).

A refusal is the proxy's own answer in the client format (403 ``budget_exceeded`` /
``model_not_allowed``, 429 with ``Retry-After``), recorded as an interception with its code as
the error and counted in ``policy_refusals_total``. An admitted request's ``max_parallel``
slots are given back when it leaves flight (``addons/in_flight.py``: response, error, abort
or its connection closing), so no slot outlives its request.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mitmproxy import http

from aibridgeproxyd.interception.policing import (
    POLICY_HOLD_KEY,
    PolicyHold,
    ask_for_stream_usage,
    enforce_policy,
)
from aibridgeproxyd.interception.routing import Refusal, answer_refusal
from aibridgeproxyd.interception.state import RequestContext, request_context
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.policy_counters import PolicyCounters
from aibridgeproxyd.reload import SnapshotHolder

if TYPE_CHECKING:  # the chain hands it over; addons never import each other at run time
    from .in_flight import InFlight

log = logging.getLogger("aibridgeproxyd.policy")

__all__ = ["EnforcePolicies"]


class EnforcePolicies:
    """Admits or refuses each routed request under the snapshot's policies
    (``interception.policing.enforce_policy``); keeps the admission on the flow for the spend
    (``addons/policy_spend.py``) and releases its slots when the flow leaves flight."""

    def __init__(
        self,
        holder: SnapshotHolder,
        counters: PolicyCounters,
        in_flight: InFlight,
        metrics: Metrics,
    ) -> None:
        self.holder = holder
        self.counters = counters
        self.in_flight = in_flight
        self.metrics = metrics

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        if ctx is None or flow.response is not None:
            return
        answer = enforce_policy(ctx, flow.request, self.holder.current.policies, self.counters)
        if isinstance(answer, Refusal):
            self._refuse(flow, ctx, answer)
            return
        if answer.effective.scopes:  # no policy applies: nothing to hold, count or release
            flow.metadata[POLICY_HOLD_KEY] = answer
            self.in_flight.on_landing(flow, answer.admission.release)
            self._usage_asked(flow, ctx, answer)

    def _usage_asked(self, flow: http.HTTPFlow, ctx: RequestContext, hold: PolicyHold) -> None:
        try:
            ask_for_stream_usage(ctx, flow.request, hold)
        except ValueError as exc:  # an encoding mitmproxy cannot re-apply: sent as it came
            log.warning("stream usage not requested: %s", exc, extra=ctx.log_ids())

    def _refuse(self, flow: http.HTTPFlow, ctx: RequestContext, refusal: Refusal) -> None:
        log.info("request refused by policy: %s", refusal.code, extra=ctx.log_ids())
        self.metrics.child(self.metrics.policy_refusals, refusal.code).inc()
        answer_refusal(flow, ctx, refusal)
