"""Exact money: Decimal USD in the code, integer nano-USD in the SQLite store.

Costs are rounded once, to ``PRECISION`` (1e-9 USD), half-up. MongoDB keeps the original's
doubles (``docs/documents.md``) so that existing dashboards keep reading them; the value
written is the rounded Decimal converted once.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP
from decimal import Decimal

PRECISION = Decimal("0.000000001")
NANOS_PER_USD = 1_000_000_000
ZERO = Decimal(0)


def quantize(amount: Decimal) -> Decimal:
    return amount.quantize(PRECISION, rounding=ROUND_HALF_UP)


def to_decimal(value: object) -> Decimal:
    """A stored number (int, float, str, Decimal, None) as a rounded Decimal; None is 0."""
    if value is None:
        return ZERO
    if isinstance(value, float):
        return quantize(Decimal(repr(value)))
    return quantize(Decimal(str(value)))


def is_number(value: object) -> bool:
    """A stored number: int, float or Decimal (a bool is not one, though Python says so)."""
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def amount_of(value: object) -> Decimal:
    """A stored field as USD: a number rounded; anything else (missing, a string) is 0."""
    return to_decimal(value) if is_number(value) else ZERO


def to_nanos(amount: Decimal | float | int | str) -> int:
    return int(to_decimal(amount) * NANOS_PER_USD)


def from_nanos(nanos: int | None) -> Decimal:
    if nanos is None:
        return ZERO
    return quantize(Decimal(nanos) / NANOS_PER_USD)


def to_float(amount: Decimal) -> float:
    return float(quantize(amount))
