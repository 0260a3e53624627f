"""Low-balance alerts of the metering addon: the settlement writer reports each balance,
the rules (``burnmeter.alerts``) find the crossings, one thread delivers them."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from addons.metrics import Metrics
from burnmeter.alerts import AlertSender
from burnmeter.alerts import Crossing
from burnmeter.alerts import Rule
from burnmeter.alerts import crossings
from burnmeter.store.base import Settlement

STOP_TIMEOUT = 2.0


class Alerts:
    """``settled`` is the writer's ``on_settled``: it computes and queues, never waits."""

    def __init__(self, rules: tuple[Rule, ...], metrics: Callable[[], Metrics | None]) -> None:
        self.rules = rules
        self._metrics = metrics
        self.sender = AlertSender(
            on_sent=self._counted("sent"),
            on_failed=self._counted("failed"),
            on_dropped=self._counted("dropped"),
        )

    def _counted(self, what: str) -> Callable[[Crossing], None]:
        def count(crossing: Crossing) -> None:
            metrics = self._metrics()
            if metrics is not None:
                metrics.alerts[what].labels(crossing.webhook).inc()

        return count

    def settled(self, settlement: Settlement, balance: Decimal) -> None:
        for crossing in crossings(self.rules, settlement, balance):
            self.sender.send(crossing)

    def stop(self) -> None:
        self.sender.stop(STOP_TIMEOUT)
