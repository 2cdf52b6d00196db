"""The documentation describes what the product prints: metric names and label sets (README and
docs/monitoring.md) and the interception record's fields (docs/monitoring.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import Counter, Gauge, Histogram

from aibridgeproxyd.metrics import Metrics
from aibridgeproxyd.model import INTERCEPTION_FIELDS

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "coder_aibridgeproxyd_"


def product_label_sets() -> dict[str, tuple[str, ...]]:
    """Every metric the daemon exports, by full name, with its label names."""
    metrics = Metrics(PREFIX)
    # provider_info is a custom collector rendered from the snapshot (the contract's labels).
    label_sets: dict[str, tuple[str, ...]] = {
        PREFIX + "provider_info": ("provider_name", "provider_type", "status")
    }
    for value in vars(metrics).values():
        if isinstance(value, Counter | Gauge | Histogram):
            name = value._name  # without the _total suffix prometheus_client adds on export
            if isinstance(value, Counter):
                name += "_total"
            label_sets[name] = tuple(value._labelnames)
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
    product = product_label_sets()
    documented = documented_label_sets(ROOT / document)
    assert set(documented) == set(product)
    for name, labels in documented.items():
        assert sorted(labels) == sorted(product[name]), name


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
    assert list(example) == ["id", *INTERCEPTION_FIELDS]
    assert example["id"] == example["request_id"]
