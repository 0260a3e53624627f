"""The report queries in SQL, for the embedded SQLite store.

Money is INTEGER nano-USD and ``createdAt`` INTEGER epoch ms (UTC) in this store, so every
sum is exact and every window is an index range on ``createdAt``: the store's
``request_logs_createdAt`` index also carries the columns these sums read, so most reports
never touch the table. ``GROUP BY +userId`` keeps the planner off the ``userId`` index (with
ANALYZE statistics it would pick it, then look up every row in the table: 3x slower), except
for the newest log per user, which that index alone answers (3x faster than the other way).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from burnmeter.config import Pool
from burnmeter.money import from_nanos
from burnmeter.periods import SLOT_MS
from burnmeter.periods import Window
from burnmeter.reports.base import Backend
from burnmeter.reports.base import ModelUsage
from burnmeter.reports.base import PoolUsage
from burnmeter.reports.base import SlotCost
from burnmeter.reports.base import UserUsage
from burnmeter.store.base import LOGS
from burnmeter.store.base import USERS
from burnmeter.store.extjson import from_ms

POOL = "COALESCE(creditType, :legacy)"
"""A log's pool: legacy logs (no ``creditType``) count as the legacy pool."""


def _q(name: str) -> str:
    """A column name from the config, quoted (config field names are identifiers)."""
    return '"' + name.replace('"', '""') + '"'


def _balance(pool: Pool) -> str:
    return " + ".join(f"COALESCE({_q(f)}, 0)" for f in pool.balance)


class SqliteReports(Backend):
    def __init__(self, conn: sqlite3.Connection, legacy_pool: str) -> None:
        self.conn = conn
        self.legacy_pool = legacy_pool

    def _rows(
        self, sql: str, window: Window | None = None, params: dict[str, Any] | None = None
    ) -> list[Any]:
        """Runs ``sql``; ``{where}`` in it becomes the window's bounds on ``createdAt``."""
        params = {"legacy": self.legacy_pool, **(params or {})}
        where = "1"
        if window is not None:
            params["end"] = window.end_ms
            where = "createdAt < :end"
            if window.start_ms is not None:
                params["start"] = window.start_ms
                where = "createdAt >= :start AND " + where
        return self.conn.execute(sql.format(logs=LOGS, where=where), params).fetchall()

    def population(self, fields: Sequence[str]) -> tuple[int, dict[str, Any]]:
        sums = "".join(f", COALESCE(SUM({_q(f)}), 0)" for f in fields)
        count, *totals = self._rows(f"SELECT COUNT(*){sums} FROM {USERS}")[0]
        return count, {f: from_nanos(t) for f, t in zip(fields, totals, strict=True)}

    def funded_users(self, pools: Sequence[Pool]) -> int:
        funded = " OR ".join(f"({_balance(p)}) > 0" for p in pools)
        return int(self._rows(f"SELECT COUNT(*) FROM {USERS} WHERE {funded}")[0][0])

    def used_counters(self, pools: Sequence[Pool]) -> dict[str, dict[str, Any]]:
        columns = ", ".join(_q(p.used) for p in pools)
        return {
            user: {p.name: from_nanos(v) for p, v in zip(pools, used, strict=True) if v is not None}
            for user, *used in self._rows(f"SELECT _id, {columns} FROM {USERS}")
        }

    def balances(self, pools: Sequence[Pool]) -> dict[str, dict[str, Any]]:
        columns = ", ".join(f"{_balance(p)}" for p in pools)
        return {
            user: {p.name: from_nanos(v) for p, v in zip(pools, amounts, strict=True)}
            for user, *amounts in self._rows(f"SELECT _id, {columns} FROM {USERS}")
        }

    def pool_usage(self, window: Window) -> list[PoolUsage]:
        sql = f"""
            SELECT {POOL}, COALESCE(SUM(creditsCost), 0), COALESCE(SUM(inputTokens), 0),
                   COALESCE(SUM(outputTokens), 0), COUNT(*),
                   COALESCE(SUM(CASE WHEN isSuccess THEN 1 ELSE 0 END), 0),
                   COALESCE(SUM(latencyMs), 0), COUNT(latencyMs)
              FROM {{logs}} WHERE {{where}} GROUP BY 1"""
        return [
            PoolUsage(pool, from_nanos(cost), *counts)
            for pool, cost, *counts in self._rows(sql, window)
        ]

    def active_users(self, window: Window) -> int:
        sql = "SELECT COUNT(DISTINCT userId) FROM {logs} WHERE {where}"
        return int(self._rows(sql, window)[0][0])

    def user_usage(self, window: Window | None, user: str | None = None) -> list[UserUsage]:
        # one user: the userId index; everyone: +userId keeps the planner off it (see above)
        who = "userId = :user" if user is not None else "userId IS NOT NULL"
        group = "userId" if user is not None else "+userId"
        sql = f"""
            SELECT userId, {POOL}, COALESCE(SUM(creditsCost), 0), COALESCE(SUM(inputTokens), 0),
                   COALESCE(SUM(outputTokens), 0), COUNT(*)
              FROM {{logs}} WHERE {{where}} AND {who} GROUP BY {group}, 2"""
        return [
            UserUsage(user_id, pool, from_nanos(cost), *counts)
            for user_id, pool, cost, *counts in self._rows(sql, window, {"user": user})
        ]

    def model_usage(self, window: Window) -> list[ModelUsage]:
        sql = """
            SELECT model, COALESCE(SUM(creditsCost), 0), COUNT(*), COALESCE(SUM(inputTokens), 0),
                   COALESCE(SUM(outputTokens), 0), COALESCE(SUM(cacheWriteTokens), 0),
                   COALESCE(SUM(cacheHitTokens), 0)
              FROM {logs} WHERE {where} GROUP BY 1"""
        return [
            ModelUsage(model, requests, input_, output, write, read, from_nanos(cost))
            for model, cost, requests, input_, output, write, read in self._rows(sql, window)
        ]

    def slot_costs(self, window: Window) -> list[SlotCost]:
        sql = f"""
            SELECT createdAt - createdAt % {SLOT_MS}, {POOL}, COALESCE(SUM(creditsCost), 0)
              FROM {{logs}} WHERE {{where}} GROUP BY 1, 2"""
        return [
            SlotCost(slot, pool, from_nanos(cost)) for slot, pool, cost in self._rows(sql, window)
        ]

    def billing_tokens(self, window: Window) -> int:
        sql = "SELECT COALESCE(SUM(tokensUsed), 0) FROM {logs} WHERE {where}"
        return int(self._rows(sql, window)[0][0])

    def last_activity(self, window: Window) -> dict[str, datetime]:
        sql = """
            SELECT userId, MAX(createdAt) FROM {logs}
             WHERE {where} AND userId IS NOT NULL GROUP BY userId"""
        return {user: from_ms(at) for user, at in self._rows(sql, window)}
