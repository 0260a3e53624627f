"""Numbers as the dashboard shows them to people: ``$12.3456``, ``1,234``, ``98.5%``."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

MISSING = "—"


def money(amount: Decimal) -> str:
    """USD to 4 decimals (the CLI table's precision), thousands separated."""
    sign = "-" if amount < 0 else ""
    return f"{sign}${abs(amount):,.4f}"


def count(n: int | None) -> str:
    return MISSING if n is None else f"{n:,}"


def percent(rate: float | None) -> str:
    return MISSING if rate is None else f"{rate:g}%"


def millis(ms: int | None) -> str:
    return MISSING if ms is None else f"{ms:,} ms"


def moment(at: datetime | None) -> str:
    """A local time to the second, without the offset (the page names the zone)."""
    return MISSING if at is None else f"{at:%Y-%m-%d %H:%M:%S}"
