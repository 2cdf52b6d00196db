"""The policy addons driven through mitmproxy's test flows, with the real route addon and the
real in-flight table: a refusal is answered in the client format before any key is chosen and
counted by reason, an exception in the check refuses (fail closed), a slot is released when the
flow leaves flight, and the spend of a finished request is counted once."""

from __future__ import annotations

import json

from aibridgeproxyd.addons.in_flight import InFlight
from aibridgeproxyd.addons.policy_enforcement import EnforcePolicies
from aibridgeproxyd.addons.policy_spend import CountPolicySpend
from aibridgeproxyd.addons.route import RouteRequests
from mitmproxy import http
from mitmproxy.test import tflow

from aibridgeproxyd.interception.policing import POLICY_HOLD_KEY
from aibridgeproxyd.interception.state import ConnectInfo, ConnectionTable, request_context
from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import ProviderRecord
from aibridgeproxyd.policy import Policy
from aibridgeproxyd.policy_counters import PolicyCounters
from aibridgeproxyd.pricing import PriceTable
from aibridgeproxyd.providers import evaluate_providers
from aibridgeproxyd.reload import SnapshotHolder
from aibridgeproxyd.snapshot import build_snapshot
from aibridgeproxyd.usage import Usage

CHAT = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


class Chain:
    """InFlight, EnforcePolicies, RouteRequests and CountPolicySpend, in the chain's order."""

    def __init__(self, *policies: Policy) -> None:
        self.holder = SnapshotHolder()
        records = [ProviderRecord(name="openai", type="openai", keys=("sk-central",))]
        self.holder.current = build_snapshot(evaluate_providers(records), [], {}, policies)
        self.connections = ConnectionTable()
        self.metrics = Metrics("t_")
        self.counters = PolicyCounters()
        self.in_flight = InFlight()
        self.enforce = EnforcePolicies(self.holder, self.counters, self.in_flight, self.metrics)
        self.route = RouteRequests(self.holder, self.connections, "aibridgeproxyd")
        self.spend = CountPolicySpend(self.counters, PriceTable())

    def send(self, model: str = "gpt-4o") -> http.HTTPFlow:
        flow = tflow.tflow()
        request = flow.request
        request.method, request.host, request.port = "POST", "api.openai.com", 443
        request.path = "/v1/chat/completions"
        request.content = CHAT.replace(b"gpt-4o", model.encode())
        info = ConnectInfo("api.openai.com", 443, intercept=True, identity="alice")
        info.provider_name, info.provider_type = "openai", "openai"
        self.connections.add(flow.client_conn, info)
        self.in_flight.requestheaders(flow)
        self.route.requestheaders(flow)
        self.enforce.request(flow)
        self.route.request(flow)
        return flow

    def refusals(self, reason: str) -> float | None:
        return self.metrics.registry.get_sample_value("t_policy_refusals_total", {"reason": reason})


def test_a_refused_request_is_answered_in_the_client_format_before_any_key_is_chosen() -> None:
    chain = Chain(Policy(user="alice", models=("claude-*",)))
    flow = chain.send()
    assert flow.response is not None and flow.response.status_code == 403
    body = json.loads(flow.response.content or b"")
    assert body["error"]["code"] == "model_not_allowed"
    assert "authorization" not in flow.request.headers  # no central key was injected
    ctx = request_context(flow)
    assert ctx is not None and ctx.proxy_answer_code == "model_not_allowed"
    assert chain.refusals("model_not_allowed") == 1


def test_an_exception_in_the_check_refuses() -> None:
    chain = Chain(Policy(rpm=5))

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("bug")

    chain.counters.admit = broken  # type: ignore[method-assign]
    flow = chain.send()
    assert flow.response is not None and flow.response.status_code == 500
    assert json.loads(flow.response.content or b"")["error"]["code"] == "policy_error"
    assert chain.refusals("policy_error") == 1


def test_a_slot_is_released_when_the_flow_leaves_flight_whichever_way() -> None:
    chain = Chain(Policy(max_parallel=1))
    first = chain.send()
    assert first.response is None  # admitted and routed
    refused = chain.send()
    assert refused.response is not None and refused.response.status_code == 429
    assert refused.response.headers["retry-after"] == "1"
    chain.in_flight.client_disconnected(first.client_conn)  # an abort without any hook
    assert chain.send().response is None


def test_the_spend_of_a_finished_request_is_counted_once() -> None:
    chain = Chain(Policy(tpm=100))
    flow = chain.send()
    ctx = request_context(flow)
    assert ctx is not None and POLICY_HOLD_KEY in flow.metadata
    ctx.recording.usage = Usage(input_tokens=60, output_tokens=40)
    chain.spend.response(flow)  # not recorded yet: nothing counted
    assert chain.counters.take_deltas()[0].tokens == 0
    ctx.recording.recorded = True
    chain.spend.response(flow)
    chain.spend.error(flow)
    (delta,) = [d for d in chain.counters.take_deltas() if d.period.startswith("minute")]
    assert delta.tokens == 100
    assert chain.send().response is not None  # tpm reached
