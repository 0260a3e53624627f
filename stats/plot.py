"""``series --plot``: spend per pool as stacked bars (matplotlib, an optional dependency)."""

from __future__ import annotations

from collections.abc import Sequence

from burnmeter.periods import Bucket
from burnmeter.periods import Window
from burnmeter.reports.base import SeriesRow

MAX_TICKS = 24


def plot_series(
    rows: Sequence[SeriesRow], pools: Sequence[str], span: Window, unit: Bucket, path: str
) -> None:
    """Write a PNG: one bar per bucket, one colour per pool, stacked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'burnmeter[plot]'") from None

    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, len(rows) * 0.3)), 4.5))
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
    ax.set_title(f"Spend per pool per {unit}\n{span.describe()}", fontsize=11)
    if pools:
        ax.legend(title="pool", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
