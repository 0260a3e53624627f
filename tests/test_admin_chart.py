"""The dashboard's server-side chart and number formats."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal as D
from zoneinfo import ZoneInfo

from stats.admin import formats
from stats.admin.chart import legend
from stats.admin.chart import series_svg

HCM = ZoneInfo("Asia/Ho_Chi_Minh")


def row(hour: int, **burned: str) -> dict[str, object]:
    start = datetime(2025, 3, 10, hour, tzinfo=HCM)
    amounts = {pool: D(v) for pool, v in burned.items()}
    return {"start": start, "end": start, "burned": amounts, "total": sum(amounts.values())}


def test_a_bar_per_pool_with_spend_stacked_to_scale() -> None:
    rows = [row(0, a="1", b="0"), row(1, a="0.5", b="1.5"), row(2, a="0", b="0")]
    svg = str(series_svg(rows, "hour"))
    assert svg.count("<rect") == 3  # zero amounts draw nothing
    assert "2025-03-10 01:00 · b: $1.5000" in svg
    assert ">$2.0000</text>" in svg  # the axis reaches the tallest bucket
    assert legend(rows) == [("a", "#2563eb"), ("b", "#ea580c")]


def test_names_are_escaped_and_an_empty_window_says_so() -> None:
    svg = str(series_svg([row(0, **{"<script>": "1"})], "day"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "No spend" in str(series_svg([], "hour"))
    assert legend([]) == []


def test_numbers_as_people_read_them() -> None:
    assert formats.money(D("1234.56789")) == "$1,234.5679"
    assert formats.money(D("-0.5")) == "-$0.5000"
    assert formats.count(1234567) == "1,234,567"
    assert formats.count(None) == formats.percent(None) == formats.millis(None) == "—"
    assert formats.percent(87.5) == "87.5%" and formats.millis(4663) == "4,663 ms"
    assert formats.moment(datetime(2025, 3, 10, 9, 5, 7, tzinfo=HCM)) == "2025-03-10 09:05:07"
