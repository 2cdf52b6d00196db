"""Charts of the dashboard's Usage page, drawn on the server as SVG geometry (no JavaScript, no
library): ``bar_chart`` turns usage rows (``[{key, <measure>: int, ...}]``, the shape of
``GET /api/v2/aibridge/usage``) into bars a template draws with ``<rect>`` and ``<text>``.

Columns (``vertical=True``) suit a time axis (one per day, oldest left); horizontal bars suit
names (provider, model, user, client), largest first. Units: SVG user units (pixels at 100 %).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WIDTH = 720
BAR_HEIGHT = 22
BAR_GAP = 6
LABEL_WIDTH = 220
VALUE_WIDTH = 110
COLUMN_AREA_HEIGHT = 180
AXIS_HEIGHT = 40
# A column's share of the width at most: a few days do not make slabs.
MAX_COLUMN_SLOT = 80
# A chart shows at most this many bars; the rest are summed into one "other" bar.
MAX_BARS = 15
# The value text of a group whose measure is unknown (null): a cost no record of it was priced
# for, never "$0.0000", as the Sessions page shows an unpriced cost.
UNKNOWN_TEXT = "\u2013"  # an en dash


@dataclass(frozen=True)
class Bar:
    """One bar: its rectangle, its label and its value as text."""

    x: float
    y: float
    width: float
    height: float
    label: str
    value_text: str
    label_x: float
    label_y: float
    value_x: float
    value_y: float


@dataclass(frozen=True)
class Chart:
    """A chart's size and bars; ``empty`` when there is nothing to draw."""

    title: str
    width: int
    height: int
    bars: tuple[Bar, ...]
    vertical: bool

    @property
    def empty(self) -> bool:
        return not self.bars


def tokens_text(value: int) -> str:
    """A token count, short: ``950``, ``12.3k``, ``4.5M``."""
    for scale, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{suffix}"
    return str(value)


def cost_text(micros: int) -> str:
    """A cost in USD from micro-dollars: ``$0.0042``, ``$12.34``; ``<$0.0001`` for a cost
    above 0 but under a hundredth of a cent (a few requests to a cheap model), which four
    decimals would show as ``$0.0000``, the cost of a free model."""
    if 0 < micros < 100:
        return "<$0.0001"
    dollars = micros / 1_000_000
    return f"${dollars:,.2f}" if dollars >= 1 else f"${dollars:.4f}"


Value = tuple[str, int | None]  # a bar's label and value; None: unknown, drawn as 0


def _values(
    rows: Sequence[Mapping[str, Any]], measure: Callable[[Mapping[str, Any]], int | None]
) -> list[Value]:
    measured = ((row, measure(row)) for row in rows)
    return [
        (str(row.get("key") or "(none)"), None if value is None else max(0, int(value)))
        for row, value in measured
    ]


def _capped(values: list[Value]) -> list[Value]:
    if len(values) <= MAX_BARS:
        return values
    kept, rest = values[: MAX_BARS - 1], [value for _, value in values[MAX_BARS - 1 :]]
    known = [value for value in rest if value is not None]
    return [*kept, ("other", sum(known) if known else None)]


def _text(value: int | None, text: Callable[[int], str]) -> str:
    return UNKNOWN_TEXT if value is None else text(value)


def bar_chart(
    title: str,
    rows: Sequence[Mapping[str, Any]],
    measure: Callable[[Mapping[str, Any]], int | None],
    text: Callable[[int], str],
    vertical: bool = False,
) -> Chart:
    """The chart of ``measure(row)`` per row, labelled by the row's ``key`` and ``text(value)``
    (``UNKNOWN_TEXT`` and no bar where the measure is None: nothing known, not zero).
    Horizontal charts sort largest first; vertical ones keep the rows' order (time)."""
    values = _values(rows, measure)
    if vertical:
        return _columns(title, values[-MAX_BARS * 4 :], text)
    values.sort(key=lambda item: (-(item[1] or 0), item[0]))
    return _bars(title, _capped(values), text)


def _bars(title: str, values: list[Value], text: Callable[[int], str]) -> Chart:
    top = max((value or 0 for _, value in values), default=0) or 1
    span = WIDTH - LABEL_WIDTH - VALUE_WIDTH
    bars = []
    for at, (label, value) in enumerate(values):
        y = at * (BAR_HEIGHT + BAR_GAP)
        width = max(1.0, span * value / top) if value else 0.0
        middle = y + BAR_HEIGHT * 0.7
        bars.append(
            Bar(
                LABEL_WIDTH,
                y,
                width,
                BAR_HEIGHT,
                label,
                _text(value, text),
                LABEL_WIDTH - 8,
                middle,
                LABEL_WIDTH + width + 6,
                middle,
            )
        )
    height = max(1, len(values) * (BAR_HEIGHT + BAR_GAP))
    return Chart(title, WIDTH, height, tuple(bars), vertical=False)


def _columns(title: str, values: list[Value], text: Callable[[int], str]) -> Chart:
    top = max((value or 0 for _, value in values), default=0) or 1
    slot = min(MAX_COLUMN_SLOT, WIDTH / max(1, len(values)))
    bars = []
    for at, (label, value) in enumerate(values):
        height = max(1.0, COLUMN_AREA_HEIGHT * value / top) if value else 0.0
        x = at * slot + slot * 0.15
        y = COLUMN_AREA_HEIGHT - height + 16
        middle = at * slot + slot / 2
        bars.append(
            Bar(
                x,
                y,
                slot * 0.7,
                height,
                label,
                _text(value, text),
                middle,
                COLUMN_AREA_HEIGHT + 32,
                middle,
                y - 4,
            )
        )
    return Chart(title, WIDTH, COLUMN_AREA_HEIGHT + AXIS_HEIGHT, tuple(bars), vertical=True)
