"""``series --plot``: spend per pool as stacked bars (matplotlib, an optional dependency).

The picture stays readable whatever the window: at most ``MAX_HOUR_BARS`` hourly bars
(longer windows are drawn per local day), a bounded width, at most ``MAX_TICKS`` labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from burnmeter.money import ZERO
from burnmeter.periods import Bucket
from burnmeter.periods import Window
from burnmeter.reports.base import SeriesRow
from stats.exceptions import UserError

MAX_TICKS = 24
MAX_HOUR_BARS = 96
WIDTH_INCHES = (8.0, 16.0)
INCHES_PER_BAR = 0.25


def by_day(rows: Sequence[SeriesRow], pools: Sequence[str]) -> list[SeriesRow]:
    """Hourly rows summed per local date (the rows' own zone)."""
    days: dict[object, SeriesRow] = {}
    for row in rows:
        day = row.start.date()
        first = days.get(day)
        if first is None:
            days[day] = SeriesRow(row.start, row.end, dict(row.burned))
            continue
        burned = {p: first.burned.get(p, ZERO) + row.burned.get(p, ZERO) for p in pools}
        days[day] = SeriesRow(first.start, row.end, burned)
    return list(days.values())


def plot_series(
    rows: Sequence[SeriesRow], pools: Sequence[str], span: Window, unit: Bucket, path: str
) -> None:
    """Write a PNG: one bar per bucket, one colour per pool, stacked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'burnmeter[plot]'") from None

    if unit == "hour" and len(rows) > MAX_HOUR_BARS:
        rows, unit = by_day(rows, pools), "day"
    total = sum((r.total for r in rows), Decimal(0))
    low, high = WIDTH_INCHES
    fig, ax = plt.subplots(figsize=(max(low, min(high, len(rows) * INCHES_PER_BAR)), 4.5))
    positions = range(len(rows))
    bottom = [0.0] * len(rows)
    for pool in pools:
        heights = [float(r.burned[pool]) for r in rows]
        ax.bar(positions, heights, bottom=bottom, label=pool, width=0.85)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    step = max(1, -(-len(rows) // MAX_TICKS))
    label = "%m-%d %H:%M" if unit == "hour" else "%Y-%m-%d"
    ax.set_xticks(
        list(positions)[::step],
        [r.start.strftime(label) for r in rows][::step],
        rotation=45,
        ha="right",
    )
    ax.set_xlabel(f"{unit} ({span.zone.key})")
    ax.set_ylabel("spend (USD)")
    ax.set_title(
        f"Spend per pool per {unit}: {total:,.6f} USD in all\n{span.describe()}", fontsize=11
    )
    if pools:
        ax.legend(title="pool", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise UserError(f"--plot {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
