"""Count each finished request's tokens and cost toward the policies it was admitted under
(docs/policies.md#enforcement): tpm this minute, budgets this day, week and month.

It follows ``RecordInterceptions``, which finishes the usage (``ctx.recording.usage``) in the
same hook; the cost is priced from the same ``PriceTable``. An observer: an exception here is
logged, never a refusal (``failclosed.TAPS``).
"""

from __future__ import annotations

from mitmproxy import http

from aibridgeproxyd.interception.policing import POLICY_HOLD_KEY, count_spend
from aibridgeproxyd.interception.state import request_context
from aibridgeproxyd.policy_counters import PolicyCounters
from aibridgeproxyd.pricing import PriceTable

__all__ = ["CountPolicySpend"]


class CountPolicySpend:
    """Adds a recorded request's spend to the policy counters, once, whichever hook ends it."""

    def __init__(self, counters: PolicyCounters, prices: PriceTable) -> None:
        self.counters = counters
        self.prices = prices

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def _count(self, flow: http.HTTPFlow) -> None:
        ctx = request_context(flow)
        hold = flow.metadata.get(POLICY_HOLD_KEY)
        if ctx is None or hold is None or not ctx.recording.recorded:
            return  # not admitted under a policy, or not finished (a WebSocket session)
        usage = ctx.recording.usage
        cost = None
        if usage is not None:
            model = usage.model or ctx.recording.request_model
            cost = self.prices.cost_micros(ctx.provider.type, model, usage)
        count_spend(hold, ctx, cost, self.counters)
