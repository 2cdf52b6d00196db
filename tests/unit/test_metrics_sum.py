"""The workers' metrics summed (aibridgeproxyd.metrics_sum): real ``Metrics`` registries, one per
worker, as the main process receives them."""

from __future__ import annotations

import json

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.metrics_sum import MetricsSum, family_samples
from tests.metric_samples import parse_samples, sample_value

P = "coder_aibridgeproxyd_"


def reported(metrics: Metrics) -> list[dict[str, object]]:
    """What a worker sends: through JSON, as over the control channel."""
    families: list[dict[str, object]] = json.loads(json.dumps(family_samples(metrics.registry)))
    return families


def value(text: bytes, name: str, **labels: str) -> float | None:
    return sample_value(parse_samples(text.decode()), P + name, **labels)


def two_workers() -> tuple[Metrics, Metrics, MetricsSum]:
    first, second = Metrics(), Metrics()
    first.mitm_requests.labels("openai").inc(2)
    second.mitm_requests.labels("openai").inc(3)
    second.mitm_requests.labels("anthropic").inc()
    first.upstream_ttfb.labels("openai").observe(0.03)
    second.upstream_ttfb.labels("openai").observe(0.2)
    first.client_connections.set(2)
    second.client_connections.set(5)
    sums = MetricsSum()
    sums.update(0, reported(first))
    sums.update(1, reported(second))
    return first, second, sums


def test_counters_gauges_and_histograms_are_summed_over_workers() -> None:
    _, _, sums = two_workers()
    text = sums.render([0, 1])
    assert value(text, "mitm_requests_total", provider="openai") == 5
    assert value(text, "mitm_requests_total", provider="anthropic") == 1
    assert value(text, "client_connections") == 7
    assert value(text, "upstream_ttfb_seconds_count", provider="openai") == 2
    assert value(text, "upstream_ttfb_seconds_sum", provider="openai") == 0.23
    assert value(text, "upstream_ttfb_seconds_bucket", provider="openai", le="0.05") == 1
    assert value(text, "upstream_ttfb_seconds_bucket", provider="openai", le="+Inf") == 2


def test_the_sum_reads_as_the_one_process_exposition_does() -> None:
    """Same families, types and label order as a single registry's text."""
    single = Metrics()
    single.mitm_requests.labels("openai").inc()
    sums = MetricsSum()
    sums.update(0, reported(single))
    assert sums.render([0]) == single.exposition()[len(single.provider_info_exposition()) :]


def test_timestamp_gauges_show_the_oldest_worker() -> None:
    first, second, sums = two_workers()
    first.last_reload_success.set(1_000)
    second.last_reload_success.set(900)
    sums.update(0, reported(first))
    sums.update(1, reported(second))
    text = sums.render([0, 1])
    assert value(text, "providers_last_reload_success_timestamp_seconds") == 900


def test_a_dead_workers_counters_stay_in_the_sum_and_its_gauges_leave() -> None:
    first, _, sums = two_workers()
    sums.retire(1)
    first.mitm_requests.labels("openai").inc()
    sums.update(0, reported(first))
    text = sums.render([0])
    assert value(text, "mitm_requests_total", provider="openai") == 6  # 3 retired + 3 live
    assert value(text, "mitm_requests_total", provider="anthropic") == 1
    assert value(text, "upstream_ttfb_seconds_count", provider="openai") == 2
    assert value(text, "client_connections") == 2


def test_a_restarted_worker_adds_to_what_its_slot_left() -> None:
    _, _, sums = two_workers()
    sums.retire(1)
    restarted = Metrics()
    restarted.mitm_requests.labels("openai").inc()
    sums.update(1, reported(restarted))
    assert value(sums.render([0, 1]), "mitm_requests_total", provider="openai") == 6
