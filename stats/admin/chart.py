"""Spend per pool over the window as stacked bars, drawn server-side as inline SVG.

No script and nothing fetched: the page works offline and the chart is in the first paint.
Every bar segment has a ``<title>`` (the browser's tooltip) with its bucket, pool and amount.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from markupsafe import Markup
from markupsafe import escape

from burnmeter.money import ZERO
from burnmeter.periods import Bucket
from stats.admin.formats import money

WIDTH, HEIGHT = 960, 240
LEFT, RIGHT, TOP, BOTTOM = 84, 8, 10, 26  # room for the axis labels
COLOURS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#ca8a04", "#db2777")
GRID_LINES = 4
MAX_LABELS = 12


def colour(index: int) -> str:
    return COLOURS[index % len(COLOURS)]


Row = Mapping[str, Any]  # a ``SeriesRow.as_dict()``


def _label(row: Row, unit: Bucket, previous: Row | None) -> str:
    start = row["start"]
    if unit == "day":
        return f"{start:%m-%d}"
    if previous is None or previous["start"].date() != start.date():
        return f"{start:%m-%d %H:%M}"
    return f"{start:%H:%M}"


def _title(row: Row, unit: Bucket) -> str:
    return f"{row['start']:%Y-%m-%d}" if unit == "day" else f"{row['start']:%Y-%m-%d %H:%M}"


def series_svg(rows: Sequence[Row], unit: Bucket) -> Markup:
    """The chart, or a short note when the window has no bucket."""
    if not rows:
        return Markup('<p class="empty">No spend in this window.</p>')
    pools = list(rows[0]["burned"])
    peak = max((r["total"] for r in rows), default=ZERO)
    scale = peak if peak > 0 else Decimal(1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / len(rows)
    bar = max(step * 0.8, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="Spend per pool per {unit}" xmlns="http://www.w3.org/2000/svg">'
    ]
    for n in range(GRID_LINES + 1):
        value = scale * n / GRID_LINES
        y = TOP + plot_h - plot_h * n / GRID_LINES
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(money(value))}</text>"
        )
    every = max(1, -(-len(rows) // MAX_LABELS))
    for i, row in enumerate(rows):
        x = LEFT + i * step + (step - bar) / 2
        y = TOP + plot_h
        for p, pool in enumerate(pools):
            amount = row["burned"].get(pool, ZERO)
            if amount <= 0:
                continue
            h = float(amount / scale) * plot_h
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour(p)}"><title>{escape(_title(row, unit))} · {escape(pool)}: '
                f"{escape(money(amount))}</title></rect>"
            )
        if i % every == 0:
            parts.append(
                f'<text class="axis" x="{x + bar / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                f"{escape(_label(row, unit, rows[i - every] if i else None))}</text>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """(pool, colour) in the order the bars stack."""
    return [(pool, colour(n)) for n, pool in enumerate(rows[0]["burned"])] if rows else []
