"""Low-balance alerts: which settlements cross an ``[[alerts]]`` threshold, and delivering them.

The balance watched is a pool's committed balance (``store.base.committed``): holds and
releases leave it as it is and each settlement lowers it by exactly its cost, so between
two top-ups one settlement, and only one, takes it across a given level, even with many
requests in flight or several proxy processes on one store. That settlement's request id
names the crossing: the alert's ``id`` is a hash of it (with the user, pool and level),
the same whichever process sends it and however often it is retried, so a receiver can
de-duplicate.

Each rule watches two levels: its ``threshold`` (the balance goes below it) and 0 (the
balance is used up). Deliveries are JSON POSTs from one background thread, retried with
exponential back-off; nothing here blocks the caller (the settlement writer).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from burnmeter.config import Config
from burnmeter.documents import utcnow
from burnmeter.exceptions import AlertConfigError
from burnmeter.store.base import Settlement

logger = logging.getLogger(__name__)

ZERO = Decimal(0)
ATTEMPTS = 6
BACKOFF = (0.5, 30.0)
"""Seconds before the first retry, and the longest wait between two attempts."""
POST_TIMEOUT = 5.0
MAX_QUEUED = 10_000
"""Alerts waiting for delivery; past that, new ones are dropped (and counted)."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``[[alerts]]`` entry with its webhook URL resolved."""

    kind: str
    threshold: Decimal
    pools: frozenset[str]
    """Empty: every pool."""
    url: str

    @property
    def levels(self) -> tuple[Decimal, ...]:
        return (self.threshold, ZERO) if self.threshold > 0 else (ZERO,)

    @property
    def webhook(self) -> str:
        """The URL without path, query or credentials: what metrics and logs may show."""
        return webhook_origin(self.url)


@dataclass(frozen=True, slots=True)
class Crossing:
    """One alert to deliver to ``url``."""

    id: str
    kind: str
    user: str
    pool: str
    balance: Decimal
    threshold: Decimal
    at: datetime
    url: str

    def payload(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "kind": self.kind,
                "user": self.user,
                "pool": self.pool,
                "balance": float(self.balance),
                "threshold": float(self.threshold),
                "at": self.at.isoformat(),
            }
        ).encode()

    @property
    def webhook(self) -> str:
        return webhook_origin(self.url)


def webhook_origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def rules(config: Config, environ: Mapping[str, str]) -> tuple[Rule, ...]:
    """The config's alerts with their webhook URLs read from the environment."""
    found = []
    for i, alert in enumerate(config.alerts):
        url = environ.get(alert.webhook_env, "").strip()
        if not url:
            raise AlertConfigError(f"alerts.{i}.webhook_env: ${alert.webhook_env} is not set")
        try:
            parts = urlsplit(url)
            valid = parts.scheme in ("http", "https") and bool(parts.hostname)
            parts.port  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            valid = False
        if not valid:
            raise AlertConfigError(
                f"alerts.{i}.webhook_env: ${alert.webhook_env} is not an http(s) URL"
            )
        found.append(Rule(alert.kind, alert.threshold, frozenset(alert.pools), url))
    return tuple(found)


def crossed(level: Decimal, before: Decimal, after: Decimal) -> bool:
    """The balance went below ``level`` (for 0: reached it) between ``before`` and ``after``."""
    if level == 0:
        return before > 0 >= after
    return before >= level > after


def crossing_id(user: str, pool: str, level: Decimal, request_id: str) -> str:
    text = "\0".join(("balance_below", user, pool, format(level.normalize(), "f"), request_id))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def crossings(
    rules: Iterable[Rule], settlement: Settlement, after: Decimal, now: datetime | None = None
) -> list[Crossing]:
    """The alerts a settlement raises: ``after`` is its pool's committed balance after it
    (so ``after + cost`` before it). One per webhook and crossing, however many rules
    name it."""
    before = after + settlement.cost
    found: dict[tuple[str, str], Crossing] = {}
    for rule in rules:
        if rule.pools and settlement.pool not in rule.pools:
            continue
        for level in rule.levels:
            if not crossed(level, before, after):
                continue
            alert_id = crossing_id(
                settlement.user_id, settlement.pool, level, settlement.request_id
            )
            found.setdefault(
                (rule.url, alert_id),
                Crossing(
                    id=alert_id,
                    kind=rule.kind,
                    user=settlement.user_id,
                    pool=settlement.pool,
                    balance=after,
                    threshold=level,
                    at=now or utcnow(),
                    url=rule.url,
                ),
            )
    return list(found.values())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirected POST would arrive as a GET without its body: a failure, not a delivery."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def post_json(url: str, body: bytes, timeout: float) -> None:
    """POST ``body``; raises ``OSError`` (``urllib.error.URLError``) unless answered 2xx."""
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "burnmeter-alerts"},
    )
    with _opener.open(request, timeout=timeout) as response:
        response.read()


Report = Callable[[Crossing], None]


class AlertSender:
    """Delivers crossings from one thread: ``send`` never blocks.

    ``on_sent`` runs for each delivered alert, ``on_failed`` for each failed attempt and
    ``on_dropped`` for an alert given up (attempts exhausted, queue full, shutdown)."""

    def __init__(
        self,
        *,
        attempts: int = ATTEMPTS,
        backoff: tuple[float, float] = BACKOFF,
        timeout: float = POST_TIMEOUT,
        max_queued: int = MAX_QUEUED,
        post: Callable[[str, bytes, float], None] = post_json,
        on_sent: Report = lambda c: None,
        on_failed: Report = lambda c: None,
        on_dropped: Report = lambda c: None,
    ) -> None:
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.max_queued = max_queued
        self.post = post
        self.on_sent = on_sent
        self.on_failed = on_failed
        self.on_dropped = on_dropped
        self._due: list[tuple[float, int, int, Crossing]] = []  # (when, seq, attempt, crossing)
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._delivering = 0
        self._thread = threading.Thread(target=self._run, name="burnmeter-alerts", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Alerts waiting for their first or next attempt, or being delivered."""
        return len(self._due) + self._delivering

    def send(self, crossing: Crossing) -> None:
        with self._cond:
            if self._stopping or len(self._due) >= self.max_queued:
                dropped = True
            else:
                dropped = False
                heapq.heappush(self._due, (time.monotonic(), next(self._seq), 0, crossing))
                self._cond.notify()
        if dropped:
            logger.error(
                "alert %s for %s/%s dropped: queue full", crossing.id, crossing.user, crossing.pool
            )
            self.on_dropped(crossing)

    def stop(self, timeout: float) -> None:
        """Stop after the attempt under way; alerts still waiting are dropped (logged)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            left, self._due = self._due, []
        for _, _, _, crossing in left:
            logger.warning("alert %s not delivered before shutdown", crossing.id)
            self.on_dropped(crossing)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._due or self._due[0][0] > time.monotonic()):
                    wait = self._due[0][0] - time.monotonic() if self._due else None
                    self._cond.wait(wait)
                if self._stopping:
                    return
                _, _, attempt, crossing = heapq.heappop(self._due)
                self._delivering = 1
            try:
                self._deliver(crossing, attempt)
            finally:
                self._delivering = 0

    def _deliver(self, crossing: Crossing, attempt: int) -> None:
        try:
            self.post(crossing.url, crossing.payload(), self.timeout)
        except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, a bad answer
            self.on_failed(crossing)
            attempt += 1
            if attempt >= self.attempts:
                logger.error(
                    "alert %s to %s given up after %d attempts: %s",
                    crossing.id,
                    crossing.webhook,
                    attempt,
                    e,
                )
                self.on_dropped(crossing)
                return
            delay = min(self.backoff[0] * 2 ** (attempt - 1), self.backoff[1])
            logger.warning(
                "alert %s to %s failed (%s), retry in %.1fs",
                crossing.id,
                crossing.webhook,
                e,
                delay,
            )
            with self._cond:
                heapq.heappush(
                    self._due, (time.monotonic() + delay, next(self._seq), attempt, crossing)
                )
            return
        self.on_sent(crossing)
