"""The workers' metrics as one process's: what the main process serves on ``/metrics`` when
``workers`` > 1 (README.md#workers).

Each worker keeps its own ``Metrics`` registry. On a scrape the main process asks every worker
for ``family_samples(registry)`` (plain JSON-ready values, over the worker's control channel)
and ``MetricsSum`` renders one exposition from them:

- counters and histograms (every bucket, ``_sum`` and ``_count``) are summed, and a worker that
  died leaves its last reported values behind (``retire``), so a sum never goes down when a
  worker is replaced (Prometheus would read a drop as a counter reset and count it again);
- gauges are summed over the live workers (connections, in-flight requests, buffered bytes),
  except ``..._timestamp_seconds`` gauges, which take the minimum: the oldest reload is the one
  an alert on stale reloads must see;
- ``provider_info`` comes rendered from one worker (every worker loads the same table).

prometheus_client's multiprocess mode was not used: it does not support the callback gauges
``Metrics`` uses (``set_function``), keeps one file per process and metric on disk, and would
change how every metric of the single-process daemon is created.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

# One family: {"name", "type", "help", "samples": [[sample name, {label: value}, value], ...]}.
Family = dict[str, Any]
# (sample name, label pairs in the registry's order): one series.
SeriesKey = tuple[str, tuple[tuple[str, str], ...]]

MONOTONIC_TYPES = frozenset({"counter", "histogram"})


def family_samples(registry: CollectorRegistry) -> list[Family]:
    """Every family of ``registry`` with its samples, as JSON-ready values (what a worker sends).
    Samples of other kinds than counters, gauges and histograms are sent as they are."""
    return [
        {
            "name": metric.name,
            "type": metric.type,
            "help": metric.documentation,
            "samples": [[s.name, dict(s.labels), s.value] for s in metric.samples],
        }
        for metric in registry.collect()
    ]


def _series_key(sample: list[Any]) -> SeriesKey:
    return str(sample[0]), tuple((str(k), str(v)) for k, v in sample[1].items())


def _combine(family: Family, current: float | None, value: float) -> float:
    if current is None:
        return value
    if family["type"] == "gauge" and str(family["name"]).endswith("_timestamp_seconds"):
        return min(current, value)
    return current + value


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class MetricsSum:
    """The sum over workers (module docstring), fed per worker slot (0 .. workers-1)."""

    def __init__(self) -> None:
        # Counter and histogram values left by workers that exited, per family and series.
        self._retired: dict[str, dict[SeriesKey, float]] = {}
        self._help: dict[str, Family] = {}
        self._last: dict[int, list[Family]] = {}

    def update(self, slot: int, families: list[Family]) -> None:
        """What the worker in ``slot`` reported now."""
        self._last[slot] = families

    def last(self, slot: int) -> list[Family] | None:
        """What the worker in ``slot`` reported last (None: nothing yet)."""
        return self._last.get(slot)

    def retire(self, slot: int) -> None:
        """The worker in ``slot`` exited: its counters and histograms stay in the sum at the
        values it reported last; its gauges leave it."""
        for family in self._last.pop(slot, []):
            if family["type"] not in MONOTONIC_TYPES:
                continue
            retired = self._retired.setdefault(family["name"], {})
            self._help.setdefault(family["name"], family)
            for sample in family["samples"]:
                key = _series_key(sample)
                retired[key] = retired.get(key, 0.0) + float(sample[2])

    def render(self, slots: Iterable[int]) -> bytes:
        """The text exposition of the sum over the last reports of ``slots`` and the retired
        values. Families keep the order the workers report them in."""
        sums: dict[str, dict[SeriesKey, float]] = {}
        shapes: dict[str, Family] = {}
        for slot in slots:
            for family in self._last.get(slot, []):
                shapes.setdefault(family["name"], family)
                series = sums.setdefault(family["name"], {})
                for sample in family["samples"]:
                    key = _series_key(sample)
                    series[key] = _combine(family, series.get(key), float(sample[2]))
        for name, retired in self._retired.items():
            shapes.setdefault(name, self._help[name])
            series = sums.setdefault(name, {})
            for key, value in retired.items():
                series[key] = series.get(key, 0.0) + value
        return _exposition(shapes, sums)


def _exposition(shapes: Mapping[str, Family], sums: Mapping[str, dict[SeriesKey, float]]) -> bytes:
    families = []
    for name, shape in shapes.items():
        metric = Metric(name, shape["help"], shape["type"])
        for (sample_name, labels), value in sums[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        families.append(metric)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return prometheus_client.generate_latest(registry)
