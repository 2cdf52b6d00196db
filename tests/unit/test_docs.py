"""The documentation describes what the product prints: metric names and label sets (README and
docs/monitoring.md), the interception record's fields (docs/monitoring.md), and token names
the examples create."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import INTERCEPTION_FIELDS
from aibridgeproxyd.sessions import (
    Children,
    SessionAggregate,
    SessionInterception,
    session_summary,
    session_threads,
)
from aibridgeproxyd.store import validate_token_name

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "coder_aibridgeproxyd_"
UNKNOWN_LABELS = ("<not the documented labels>",)


def product_label_sets(documented: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Every metric the daemon exports, by exported name, with its label names as /metrics shows
    them.

    A labelled metric shows no sample (so no label names) until a child exists, and
    prometheus_client has no public accessor for the names, so each metric is given a child
    labelled as ``documented`` says: ``labels()`` accepts exactly the metric's own label names
    and raises ValueError for any other set. A labelled metric whose documented labels are wrong
    thus stays without samples and is reported as ``UNKNOWN_LABELS``."""
    metrics = Metrics(PREFIX)
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            (family,) = value.describe()
            name = family.name + ("_total" if family.type == "counter" else "")
            with contextlib.suppress(ValueError):  # documented wrongly, or not labelled at all
                value.labels(**dict.fromkeys(documented.get(name, ()), "probe"))
    label_sets: dict[str, tuple[str, ...]] = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        names = {label for sample in family.samples for label in sample.labels} - {"le"}
        label_sets[name] = tuple(sorted(names)) if family.samples else UNKNOWN_LABELS
    # provider_info is a custom collector rendered from the snapshot (the contract's labels).
    label_sets[PREFIX + "provider_info"] = ("provider_name", "provider_type", "status")
    return label_sets


def documented_label_sets(path: Path) -> dict[str, tuple[str, ...]]:
    """Rows of markdown tables whose first cell is a backticked metric name: the labels column
    lists label names in backticks; values follow in parentheses or after '='."""
    documented = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(rf"`{PREFIX}\w+`", cells[0]):
            continue
        labels_cell = re.sub(r"\([^)]*\)", "", cells[2])
        labels = tuple(
            match.group(1)
            for part in labels_cell.split(",")
            if (match := re.match(r"\s*`(\w+)`", part.split("=")[0]))
        )
        documented[cells[0].strip("`")] = labels
    return documented


@pytest.mark.parametrize("document", ["README.md", "docs/monitoring.md"])
def test_documented_metrics_have_the_products_names_and_label_sets(document: str) -> None:
    documented = documented_label_sets(ROOT / document)
    product = product_label_sets(documented)
    assert set(documented) == set(product)
    for name, labels in documented.items():
        assert sorted(labels) == sorted(product[name]), name


def test_the_cost_counters_help_names_every_source_of_a_price() -> None:
    # /metrics is what an operator reads first: its HELP named genai-prices and the config's
    # prices: but not `prices set`, the first source docs/monitoring.md#cost lists.
    exposition = generate_latest(Metrics(PREFIX).registry).decode()
    (help_line,) = [line for line in exposition.splitlines() if "HELP " + PREFIX + "cost_m" in line]
    for source in ("prices set", "prices:", "genai-prices"):
        assert source in help_line


def test_documented_interception_record_fields_are_the_products() -> None:
    text = (ROOT / "docs/monitoring.md").read_text()
    section = text[text.index("## Interception records") : text.index("### Token usage")]
    documented = []
    for line in section.splitlines():
        if line.startswith("| `"):
            documented += re.findall(r"`(\w+)`", line.split("|")[1])
    assert documented == ["id", *INTERCEPTION_FIELDS]
    example_block = re.search(r"```json\n(.*?)```", text, re.DOTALL)
    assert example_block is not None
    example = json.loads(example_block.group(1))[0]
    # A listed record also carries what was recorded with it (Store.list_interceptions).
    assert list(example) == ["id", *INTERCEPTION_FIELDS, "prompts", "tool_calls", "thoughts"]
    assert example["id"] == example["request_id"]


DOCUMENTED_FILES = ("README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))


def test_documented_token_names_are_accepted() -> None:
    # A reader copies `tokens create NAME` as it stands: a name the store refuses (the reserved
    # `me`) breaks the example at its first line.
    names = {
        match.group(1)
        for document in DOCUMENTED_FILES
        for match in re.finditer(r"tokens create ([^\s)`]+)", (ROOT / document).read_text())
        if not match.group(1).isupper()  # a placeholder such as NAME
    }
    assert {"alice", "ops"} <= names
    for name in sorted(names):
        validate_token_name(name)


def _session_section() -> str:
    text = (ROOT / "docs/monitoring.md").read_text()
    return text[text.index("### Sessions and threads") : text.index("### The data API")]


def _one_session() -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``sessions list`` and ``sessions show`` print for a session of one interception,
    built by the functions the store hands its rows to."""
    aggregate = SessionAggregate(
        "s", "t0", "t0", "t1", 1, 1, 2, None, None, 3, '["openai"]', '["gpt-4o"]', '["openai"]'
    )
    row = SessionInterception(
        "s", "s", "gpt-4o", "openai", "openai", 200, None, "t0", "t1", "central", None,
        1, 2, None, None,
    )  # fmt: skip
    (thread,) = session_threads([row], Children())
    return session_summary(aggregate, '["Unknown", "alice"]', None), thread


def test_documented_session_fields_are_the_products() -> None:
    # A reader writing a jq filter from the tables must find every field `sessions list` and
    # `sessions show` print, under its name (provider_names, a thread's provider_name and an
    # interception's error were missing).
    section = _session_section()
    summary, thread = _one_session()
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    assert [name for cell in rows for name in re.findall(r"`(\w+)`", cell)] == list(summary)
    shapes = re.findall(r"\{(id, [a-z_, \n]+)\}", section.split("sessions show ID` prints")[1])
    thread_fields, interception_fields = ([f.strip() for f in s.split(",")] for s in shapes[:2])
    assert thread_fields == list(thread)
    assert interception_fields == list(thread["interceptions"][0])
