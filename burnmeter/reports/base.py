"""Spend reports: result types and everything that does not depend on the store.

A ``Backend`` answers a few grouped queries (SQL on SQLite, pipelines on MongoDB); the
``Reports`` class turns them into the reports ``docs/reports.md`` describes. Both backends
attribute a log with no ``creditType`` (legacy, or null) to the legacy pool they are given
(``OriginalPools.legacy``) themselves.
"""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections import defaultdict
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from decimal import Decimal
from typing import Any

from burnmeter.config import Pool
from burnmeter.money import ZERO
from burnmeter.periods import ALL
from burnmeter.periods import Bucket
from burnmeter.periods import Window
from burnmeter.periods import bucket_edges
from burnmeter.periods import bucket_index
from burnmeter.store.extjson import from_ms

BALANCE_FIELDS = {
    "total_credits": "credits",
    "total_ref_credits": "refCredits",
    "total_creditsNew": "creditsNew",
}
"""The summary's balance totals: each sums one usersNew field, whichever pool spends it."""
BURNED_COUNTER = "creditsUsed"
NEW_BURNED_COUNTER = "creditsNewUsed"
NO_POOL = "legacy"
"""Where logs without ``creditType`` are reported when no configured pool counts
``creditsUsed`` (the counter of the pool the original billed before it wrote the field)."""


@dataclass(frozen=True, slots=True)
class OriginalPools:
    """The pools the original's summary fields stand for, found in the config by the usersNew
    counter each one charges (``docs/reports.md``): "Burned" (``total_credits_used``) is the
    pool counting ``creditsUsed``, plus the logs without ``creditType``; "New Burned"
    (``total_creditsNewUsed``) the pool counting ``creditsNewUsed``."""

    legacy: str
    new: str | None

    @classmethod
    def of(cls, pools: Mapping[str, Pool]) -> OriginalPools:
        def counting(counter: str) -> str | None:
            return next((name for name, p in pools.items() if p.used == counter), None)

        return cls(legacy=counting(BURNED_COUNTER) or NO_POOL, new=counting(NEW_BURNED_COUNTER))


# -- what a backend answers ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PoolUsage:
    """The logs of one pool in a window."""

    pool: str
    cost: Decimal
    input_tokens: int
    output_tokens: int
    requests: int
    successes: int
    latency_total: int  # Σ latencyMs over the logs that have one
    latency_count: int


@dataclass(frozen=True, slots=True)
class UserUsage:
    """One user's logs on one pool in a window."""

    user: str
    pool: str
    cost: Decimal
    input_tokens: int
    output_tokens: int
    requests: int


@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str | None
    requests: int
    input_tokens: int
    output_tokens: int
    cache_write_tokens: int
    cache_read_tokens: int
    cost: Decimal


@dataclass(frozen=True, slots=True)
class SlotCost:
    """Σ cost of one pool in one ``periods.SLOT`` of UTC time starting at ``slot_ms``."""

    slot_ms: int
    pool: str
    cost: Decimal


class Backend(ABC):
    """The grouped queries each store answers on its own server (never log by log)."""

    @abstractmethod
    def population(self, fields: Sequence[str]) -> tuple[int, dict[str, Decimal]]:
        """Number of users and Σ of each money field over them (missing counts 0)."""

    @abstractmethod
    def funded_users(self, pools: Sequence[Pool]) -> int:
        """Users with at least one pool whose balance fields sum to more than 0."""

    @abstractmethod
    def used_counters(self, pools: Sequence[Pool]) -> dict[str, dict[str, Decimal]]:
        """Each user's ``used`` counter of each pool: {user: {pool: amount}}."""

    @abstractmethod
    def pool_usage(self, window: Window) -> list[PoolUsage]: ...

    @abstractmethod
    def active_users(self, window: Window) -> int:
        """Distinct userId with a log in the window."""

    @abstractmethod
    def user_usage(self, window: Window | None, user: str | None = None) -> list[UserUsage]:
        """Per user and pool; ``None``: every log, whenever it was written. With ``user``,
        that user's rows only."""

    @abstractmethod
    def model_usage(self, window: Window) -> list[ModelUsage]: ...

    @abstractmethod
    def slot_costs(self, window: Window) -> list[SlotCost]: ...

    @abstractmethod
    def billing_tokens(self, window: Window) -> int:
        """Σ ``tokensUsed`` (billing tokens, ``docs/routing.md``) of the logs in the window."""

    @abstractmethod
    def last_activity(self, window: Window) -> dict[str, datetime]:
        """Each user's newest log in the window: {user: createdAt}."""

    @abstractmethod
    def balances(self, pools: Sequence[Pool]) -> dict[str, dict[str, Decimal]]:
        """Each user's current balance in each pool (its balance fields summed)."""


# -- what the reports return --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Summary:
    window: Window
    total_users: int
    balances: dict[str, Decimal]  # BALANCE_FIELDS keys
    burned_by_pool: dict[str, Decimal]
    input_tokens: int
    output_tokens: int
    requests: int
    success_rate: float | None  # percent of requests with isSuccess; None without requests
    avg_latency_ms: int | None  # rounded; None without a logged latency
    active_users: int
    original_pools: OriginalPools

    @property
    def burned(self) -> Decimal:
        """ "Burned": the legacy pool, logs without ``creditType`` included."""
        return self.burned_by_pool.get(self.original_pools.legacy, ZERO)

    @property
    def new_burned(self) -> Decimal:
        """ "New Burned": the pool counting ``creditsNewUsed`` only."""
        new = self.original_pools.new
        return self.burned_by_pool.get(new, ZERO) if new is not None else ZERO

    @property
    def total_burned(self) -> Decimal:
        return sum(self.burned_by_pool.values(), ZERO)

    def as_dict(self) -> dict[str, Any]:
        """The summary's fields (the original's names), in its order (``docs/reports.md``)."""
        return {
            "total_users": self.total_users,
            **self.balances,
            "total_credits_used": self.burned,
            "total_creditsNewUsed": self.new_burned,
            "total_burned": self.total_burned,
            "burned_by_pool": dict(self.burned_by_pool),
            "total_input_tokens": self.input_tokens,
            "total_output_tokens": self.output_tokens,
            "requests": self.requests,
            "success_rate": self.success_rate,
            "avg_latency_ms": self.avg_latency_ms,
            "active_users": self.active_users,
            "period": self.window.period,
            "window_start": self.window.local_start,
            "window_end": self.window.local_end,
        }


@dataclass(frozen=True, slots=True)
class Metrics:
    """The original admin API's request metrics over a window (README, "The admin dashboard")."""

    window: Window
    requests: int
    tokens_used: int  # Σ tokensUsed
    success_rate: float | None
    avg_latency_ms: int | None

    def as_dict(self) -> dict[str, Any]:
        """The original's ``/admin/metrics`` fields; ``timestamp`` is the window's end."""
        return {
            "total_requests": self.requests,
            "tokens_used": self.tokens_used,
            "avg_latency_ms": self.avg_latency_ms,
            "success_rate": self.success_rate,
            "timestamp": self.window.local_end,
        }


@dataclass(frozen=True, slots=True)
class Account:
    """One user: spend, tokens and requests in a window, newest log, balances now."""

    user: str
    burned_by_pool: dict[str, Decimal]
    input_tokens: int
    output_tokens: int
    requests: int
    last_activity: datetime | None
    balances: dict[str, Decimal]

    @property
    def burned(self) -> Decimal:
        return sum(self.burned_by_pool.values(), ZERO)


@dataclass(frozen=True, slots=True)
class SeriesRow:
    """Spend per pool in one local hour or day: ``[start, end)`` in the reporting zone."""

    start: datetime
    end: datetime
    burned: dict[str, Decimal]

    @property
    def total(self) -> Decimal:
        return sum(self.burned.values(), ZERO)

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "burned": self.burned, "total": self.total}


@dataclass(frozen=True, slots=True)
class Mismatch:
    """A pool's ``used`` counter that disagrees with the logs' Σ creditsCost."""

    user: str
    pool: str
    used: Decimal
    logged: Decimal

    @property
    def difference(self) -> Decimal:
        return self.used - self.logged


@dataclass
class Reports:
    """Every report over one backend, for the config's pools."""

    backend: Backend
    pools: Mapping[str, Pool] = field(default_factory=dict)

    def pool_names(self, seen: Iterable[str]) -> list[str]:
        """The configured pools in config order, then any other pool the logs name."""
        names = list(self.pools)
        return names + sorted(set(seen) - set(names))

    def summary(self, window: Window) -> Summary:
        total_users, sums = self.backend.population(list(BALANCE_FIELDS.values()))
        usage = self.backend.pool_usage(window)
        by_pool = {u.pool: u for u in usage}
        if window.period == ALL:
            active = self.backend.funded_users(list(self.pools.values()))
        else:
            active = self.backend.active_users(window)
        return Summary(
            window=window,
            total_users=total_users,
            balances={key: sums.get(name, ZERO) for key, name in BALANCE_FIELDS.items()},
            burned_by_pool={
                name: by_pool[name].cost if name in by_pool else ZERO
                for name in self.pool_names(by_pool)
            },
            input_tokens=sum(u.input_tokens for u in usage),
            output_tokens=sum(u.output_tokens for u in usage),
            requests=sum(u.requests for u in usage),
            success_rate=_success_rate(usage),
            avg_latency_ms=_avg_latency(usage),
            active_users=active,
            original_pools=OriginalPools.of(self.pools),
        )

    def metrics(self, window: Window) -> Metrics:
        usage = self.backend.pool_usage(window)
        return Metrics(
            window=window,
            requests=sum(u.requests for u in usage),
            tokens_used=self.backend.billing_tokens(window),
            success_rate=_success_rate(usage),
            avg_latency_ms=_avg_latency(usage),
        )

    def users(self, window: Window, top: int | None = None) -> list[UserUsage]:
        """Per user and pool; users by their total cost (then requests), highest first."""
        rows = self.backend.user_usage(window)
        cost: dict[str, Decimal] = defaultdict(Decimal)
        requests: dict[str, int] = defaultdict(int)
        for row in rows:
            cost[row.user] += row.cost
            requests[row.user] += row.requests
        ranked = sorted(cost, key=lambda user: (-cost[user], -requests[user], user))
        rank = {user: n for n, user in enumerate(ranked[:top] if top is not None else ranked)}
        order = {name: n for n, name in enumerate(self.pool_names(r.pool for r in rows))}
        return sorted(
            (r for r in rows if r.user in rank), key=lambda r: (rank[r.user], order[r.pool])
        )

    def accounts(self, window: Window, top: int | None = None) -> list[Account]:
        """Every user (known to the users collection or to the logs), by spend in the window
        (as ``users``), then by name; balances are current."""
        usage = self.users(window)
        balances = self.backend.balances(list(self.pools.values()))
        last = self.backend.last_activity(window)
        ranked = list(dict.fromkeys(r.user for r in usage)) + sorted(
            set(balances) - {r.user for r in usage}
        )
        rows: dict[str, list[UserUsage]] = defaultdict(list)
        for r in usage:
            rows[r.user].append(r)
        return [
            Account(
                user=user,
                burned_by_pool={r.pool: r.cost for r in rows[user]},
                input_tokens=sum(r.input_tokens for r in rows[user]),
                output_tokens=sum(r.output_tokens for r in rows[user]),
                requests=sum(r.requests for r in rows[user]),
                last_activity=last.get(user),
                balances=balances.get(user, {}),
            )
            for user in (ranked if top is None else ranked[:top])
        ]

    def models(self, window: Window) -> list[ModelUsage]:
        """Per model, by cost then requests, highest first."""
        rows = self.backend.model_usage(window)
        return sorted(rows, key=lambda r: (-r.cost, -r.requests, r.model or ""))

    def series(self, window: Window, unit: Bucket) -> list[SeriesRow]:
        """Spend per pool in every local hour or day of the window (empty ones included).

        For ``all`` the series starts at the bucket of the first log."""
        slots = self.backend.slot_costs(window)
        if window.start is None and not slots:
            return []
        start = window.start or from_ms(min(s.slot_ms for s in slots))
        edges = bucket_edges(start, window.end, window.zone, unit)
        names = self.pool_names(s.pool for s in slots)
        rows = [
            SeriesRow(
                a.astimezone(window.zone), b.astimezone(window.zone), dict.fromkeys(names, ZERO)
            )
            for a, b in zip(edges, edges[1:], strict=False)
        ]
        for slot in slots:
            rows[bucket_index(edges, from_ms(slot.slot_ms))].burned[slot.pool] += slot.cost
        return rows

    def reconcile(self, tolerance: Decimal) -> list[Mismatch]:
        """Per user and pool where ``used`` and Σ logged cost differ by more than ``tolerance``."""
        logged: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        for row in self.backend.user_usage(None):
            logged[row.user, row.pool] += row.cost
        used = self.backend.used_counters(list(self.pools.values()))
        keys = set(logged) | {(user, pool) for user, pools in used.items() for pool in pools}
        found = (
            Mismatch(user, pool, used.get(user, {}).get(pool, ZERO), logged.get((user, pool), ZERO))
            for user, pool in keys
        )
        return sorted(
            (m for m in found if abs(m.difference) > tolerance),
            key=lambda m: (-abs(m.difference), m.user, m.pool),
        )


def _success_rate(usage: Sequence[PoolUsage]) -> float | None:
    """Percent of requests with isSuccess, to 2 decimals; None without requests."""
    requests = sum(u.requests for u in usage)
    return round(100 * sum(u.successes for u in usage) / requests, 2) if requests else None


def _avg_latency(usage: Sequence[PoolUsage]) -> int | None:
    """Mean latencyMs over the logs that have one, rounded half up; None without any."""
    count = sum(u.latency_count for u in usage)
    total = sum(u.latency_total for u in usage)
    return (2 * total + count) // (2 * count) if count else None
