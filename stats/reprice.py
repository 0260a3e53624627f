"""``burnmeter reprice``: each log's cost recomputed from its recorded usage at today's prices.

Read-only: an operator's check after changing prices or finding a pricing bug. A log is
repriced at the config's current rates for its model, times the route multiplier it was
charged with (``routeMultiplier``; a log without one: the multiplier of the route its
``host`` names today, else 1). A log without usage (``usageSource: "none"``) costs 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from decimal import InvalidOperation
from typing import TYPE_CHECKING
from typing import Any

import click

from burnmeter.config import Config
from burnmeter.documents import usage_of_log
from burnmeter.exceptions import UnknownModelError
from burnmeter.money import ZERO
from burnmeter.money import to_decimal
from burnmeter.periods import Window
from burnmeter.pricing import cost
from burnmeter.pricing import resolve_price
from stats.output import emit_rows
from stats.output import format_option
from stats.reports import period_options

if TYPE_CHECKING:
    from stats.context import Context

COLUMNS = ["model", "requests", "logged", "recomputed", "difference", "unpriced"]


@dataclass
class ModelReprice:
    """One model's logs: Σ logged cost, Σ recomputed cost; ``unpriced`` logs have no price
    today (their logged cost is in ``logged``, nothing in ``recomputed``)."""

    model: str | None
    requests: int = 0
    logged: Decimal = ZERO
    recomputed: Decimal = ZERO
    unpriced: int = 0

    @property
    def difference(self) -> Decimal:
        return self.recomputed - self.logged

    def row(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "requests": self.requests,
            "logged": self.logged,
            "recomputed": self.recomputed,
            "difference": self.difference,
            "unpriced": self.unpriced,
        }


def reprice(config: Config, logs: Iterable[dict[str, Any]]) -> list[ModelReprice]:
    """Per model, largest difference first."""
    by_model: dict[str | None, ModelReprice] = {}
    for log in logs:
        model = log.get("model") if isinstance(log.get("model"), str) else None
        entry = by_model.setdefault(model, ModelReprice(model))
        entry.requests += 1
        entry.logged += to_decimal(log.get("creditsCost"))
        recomputed = recompute(config, log)
        if recomputed is None:
            entry.unpriced += 1
        else:
            entry.recomputed += recomputed
    return sorted(by_model.values(), key=lambda e: (-abs(e.difference), e.model or ""))


def recompute(config: Config, log: dict[str, Any]) -> Decimal | None:
    """The log's cost at today's prices; None if its model has none."""
    model = log.get("model")
    if not isinstance(model, str):
        return None
    if log.get("usageSource") == "none":
        return ZERO
    upstream, path = log.get("upstream"), log.get("path")
    url = f"https://{upstream}{path if isinstance(path, str) else ''}" if upstream else None
    try:
        quote = resolve_price(config, model, _route_multiplier(config, log), upstream_url=url)
    except UnknownModelError:
        return None
    return cost(usage_of_log(log), quote)


def _route_multiplier(config: Config, log: dict[str, Any]) -> Decimal:
    logged = log.get("routeMultiplier")
    if isinstance(logged, str):
        try:
            return Decimal(logged)
        except InvalidOperation:
            pass
    host = log.get("host")
    if isinstance(host, str):
        name, _, port = host.partition(":")
        route = config.route(name, int(port) if port.isdigit() else None, None)
        if route is not None:
            return route.multiplier
    return Decimal(1)


@click.command("reprice")
@click.pass_obj
@period_options
@format_option
def reprice_command(state: Context, span: Window, fmt: str) -> None:
    """Per model: logged cost, cost recomputed from the logged usage at today's prices, and
    the difference (recomputed − logged), over the period. Changes nothing.

    A log is repriced at the route multiplier it was charged with; `unpriced` counts logs
    whose model has no price today.
    """
    rows = reprice(state.config, state.read_only_store.logs_between(span.start, span.end))
    emit_rows([row.row() for row in rows], COLUMNS, fmt)
