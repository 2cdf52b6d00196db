"""Statistics helpers and the printed tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PROXIES = ("direct", "mitmdump", "ours")


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def fmt(value: float | str | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


@dataclass
class Row:
    scenario: str
    metric: str
    values: dict[str, float | None]  # by proxy name
    note: str = ""
    ratios: bool = True  # print ours/mitmdump and ours/direct

    def cells(self, base: bool = False) -> list[str]:
        """The row's cells; ``base``: with the columns of ``--base`` (its value, base/mitmdump
        and ours/base)."""
        ours, mitm, direct = (self.values.get(k) for k in ("ours", "mitmdump", "direct"))
        out = [self.scenario, self.metric, *(fmt(self.values.get(k)) for k in PROXIES)]
        if base:
            out.append(fmt(self.values.get("base")))
        if self.ratios:
            out += [fmt(ratio(ours, mitm)), fmt(ratio(ours, direct))]
            if base:
                based = self.values.get("base")
                out += [fmt(ratio(based, mitm)), fmt(ratio(ours, based))]
        else:
            out += ["", "", "", ""] if base else ["", ""]
        out.append(self.note)
        return out


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Verdict:
    target: str
    measured: str
    holds: bool | None  # None: not measured in this run


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, object] = field(default_factory=dict)


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(results: Results) -> str:
    parts = []
    if results.rows:
        base = any(row.values.get("base") is not None for row in results.rows)
        header = ["scenario", "metric", *PROXIES, "ours/mitmdump", "ours/direct", "note"]
        if base:
            header[5:7] = ["base", "ours/mitmdump", "ours/direct", "base/mitmdump", "ours/base"]
        parts.append("### Side by side (medians unless stated)\n")
        parts.append(markdown(header, [row.cells(base) for row in results.rows]))
    for table in results.tables:
        parts.append(f"\n### {table.title}\n")
        parts.append(markdown(table.header, table.rows))
    if results.verdicts:
        parts.append("\n### Contract section 11 targets\n")
        rows = [
            [v.target, v.measured, {True: "holds", False: "MISSES", None: "not measured"}[v.holds]]
            for v in results.verdicts
        ]
        parts.append(markdown(["target", "measured", "verdict"], rows))
    if results.notes:
        parts.append("\n" + "\n".join(f"- {note}" for note in results.notes))
    return "\n".join(parts) + "\n"
