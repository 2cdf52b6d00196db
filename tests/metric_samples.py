"""Metric samples as a scraper reads them, for every test that checks a metric.

A daemon's ``/metrics`` text and an in-process ``CollectorRegistry`` go through the same public
parser (``prometheus_client.parser.text_string_to_metric_families``), so no test reads
prometheus_client's private fields and every test sees the exported names (``_total``,
``_count``, ...):

    samples = registry_samples(metrics.registry)
    assert sample_value(samples, "coder_aibridgeproxyd_hook_failures_total", addon="Classify") == 1
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

# (sample name, frozenset of its (label, value) pairs)
MetricKey = tuple[str, frozenset[tuple[str, str]]]


def parse_samples(text: str) -> dict[MetricKey, float]:
    """Every sample in Prometheus text exposition ``text``, keyed by name and label pairs."""
    samples: dict[MetricKey, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def registry_samples(registry: CollectorRegistry) -> dict[MetricKey, float]:
    """Every sample ``registry`` would export on ``/metrics`` now."""
    return parse_samples(generate_latest(registry).decode())


def sample_value(samples: Mapping[MetricKey, float], name: str, /, **labels: str) -> float | None:
    """The sum of the samples named ``name`` whose labels include ``labels``.

    None when no sample matches, so a series that does not exist can be told from a zero.
    """
    wanted = set(labels.items())
    values = [
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and wanted <= sample_labels
    ]
    return sum(values) if values else None
