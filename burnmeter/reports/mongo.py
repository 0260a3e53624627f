"""The report queries as MongoDB aggregation pipelines (MongoDB 5.0+ operators only).

Window bounds are computed in Python and matched on ``createdAt``; grouping happens on the
server. The pipelines stay inside what mongomock implements, so the tested code is the
shipped code: ``$ifNull`` for a null-or-missing ``creditType``, and slots from
``$subtract`` of two dates (milliseconds) rather than ``$dateToString`` with a timezone.
Money fields are doubles here; sums are rounded to nano-USD once, on the way out. Dates
are compared as aware UTC datetimes (the store's client is ``tz_aware``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from burnmeter.config import Pool
from burnmeter.money import ZERO
from burnmeter.money import amount_of
from burnmeter.money import to_decimal
from burnmeter.periods import SLOT_MS
from burnmeter.periods import Window
from burnmeter.reports.base import Backend
from burnmeter.reports.base import ModelUsage
from burnmeter.reports.base import PoolUsage
from burnmeter.reports.base import SlotCost
from burnmeter.reports.base import UserUsage
from burnmeter.store.base import LOGS
from burnmeter.store.base import USERS
from burnmeter.store.extjson import EPOCH


def _sum(field: str) -> dict[str, Any]:
    return {"$sum": {"$ifNull": [f"${field}", 0]}}


def _count_if(condition: dict[str, Any]) -> dict[str, Any]:
    return {"$sum": {"$cond": [condition, 1, 0]}}


WITH_USER = {"$match": {"userId": {"$ne": None}}}
"""Logs that belong to a user (``docs/documents.md``): the original wrote none for its own operator key (as SQL's
COUNT(DISTINCT) and the SQLite reports skip NULL)."""


def _match(window: Window | None) -> dict[str, Any]:
    """The window's bounds on ``createdAt``; ``None``: every log."""
    if window is None:
        return {"$match": {}}
    bounds = {"$lt": window.end}
    if window.start is not None:
        bounds["$gte"] = window.start
    return {"$match": {"createdAt": bounds}}


def _balance(pool: Pool) -> dict[str, Any]:
    return {"$add": [{"$ifNull": [f"${f}", 0]} for f in pool.balance]}


class MongoReports(Backend):
    def __init__(self, db: Any, legacy_pool: str) -> None:
        self.users = db[USERS]
        self.logs = db[LOGS]
        self.pool = {"$ifNull": ["$creditType", legacy_pool]}
        """A log's pool: legacy logs (no ``creditType``) count as the legacy pool."""

    def population(self, fields: Sequence[str]) -> tuple[int, dict[str, Decimal]]:
        group = {"_id": None, "n": {"$sum": 1}} | {f: _sum(f) for f in fields}
        found = list(self.users.aggregate([{"$group": group}])) or [{"n": 0}]
        return int(found[0]["n"]), {f: to_decimal(found[0].get(f)) for f in fields}

    def funded_users(self, pools: Sequence[Pool]) -> int:
        funded = {"$or": [{"$gt": [_balance(p), 0]} for p in pools]}
        found = list(self.users.aggregate([{"$group": {"_id": None, "n": _count_if(funded)}}]))
        return int(found[0]["n"]) if found else 0

    def used_counters(self, pools: Sequence[Pool]) -> dict[str, dict[str, Decimal]]:
        projection = {p.used: 1 for p in pools}
        return {
            doc["_id"]: {
                p.name: to_decimal(doc[p.used]) for p in pools if doc.get(p.used) is not None
            }
            for doc in self.users.find({}, projection)
        }

    def balances(self, pools: Sequence[Pool]) -> dict[str, dict[str, Decimal]]:
        """A field that holds no number counts 0, as ``$sum`` counts it in ``population``."""
        projection = {f: 1 for p in pools for f in p.balance}
        return {
            doc["_id"]: {
                p.name: sum((amount_of(doc.get(f)) for f in p.balance), ZERO) for p in pools
            }
            for doc in self.users.find({}, projection)
        }

    def pool_usage(self, window: Window) -> list[PoolUsage]:
        group = {
            "_id": self.pool,
            "cost": _sum("creditsCost"),
            "input": _sum("inputTokens"),
            "output": _sum("outputTokens"),
            "requests": {"$sum": 1},
            "successes": _count_if({"$eq": ["$isSuccess", True]}),
            "latency": _sum("latencyMs"),
            "timed": _count_if({"$ne": [{"$ifNull": ["$latencyMs", None]}, None]}),
        }
        return [
            PoolUsage(
                d["_id"],
                to_decimal(d["cost"]),
                int(d["input"]),
                int(d["output"]),
                int(d["requests"]),
                int(d["successes"]),
                int(d["latency"]),
                int(d["timed"]),
            )
            for d in self.logs.aggregate([_match(window), {"$group": group}])
        ]

    def active_users(self, window: Window) -> int:
        pipeline = [_match(window), WITH_USER, {"$group": {"_id": "$userId"}}, {"$count": "n"}]
        found = list(self.logs.aggregate(pipeline))
        return int(found[0]["n"]) if found else 0

    def user_usage(self, window: Window | None, user: str | None = None) -> list[UserUsage]:
        who = WITH_USER if user is None else {"$match": {"userId": user}}
        group = {
            "_id": {"user": "$userId", "pool": self.pool},
            "cost": _sum("creditsCost"),
            "input": _sum("inputTokens"),
            "output": _sum("outputTokens"),
            "requests": {"$sum": 1},
        }
        return [
            UserUsage(
                d["_id"]["user"],
                d["_id"]["pool"],
                to_decimal(d["cost"]),
                int(d["input"]),
                int(d["output"]),
                int(d["requests"]),
            )
            for d in self.logs.aggregate([_match(window), who, {"$group": group}])
        ]

    def model_usage(self, window: Window) -> list[ModelUsage]:
        group = {
            "_id": "$model",
            "requests": {"$sum": 1},
            "input": _sum("inputTokens"),
            "output": _sum("outputTokens"),
            "cache_write": _sum("cacheWriteTokens"),
            "cache_read": _sum("cacheHitTokens"),
            "cost": _sum("creditsCost"),
        }
        return [
            ModelUsage(
                d["_id"],
                int(d["requests"]),
                int(d["input"]),
                int(d["output"]),
                int(d["cache_write"]),
                int(d["cache_read"]),
                to_decimal(d["cost"]),
            )
            for d in self.logs.aggregate([_match(window), {"$group": group}])
        ]

    def slot_costs(self, window: Window) -> list[SlotCost]:
        ms = {"$subtract": ["$createdAt", EPOCH]}
        slot = {"$subtract": [ms, {"$mod": [ms, SLOT_MS]}]}
        group = {"_id": {"slot": slot, "pool": self.pool}, "cost": _sum("creditsCost")}
        return [
            SlotCost(int(d["_id"]["slot"]), d["_id"]["pool"], to_decimal(d["cost"]))
            for d in self.logs.aggregate([_match(window), {"$group": group}])
        ]

    def billing_tokens(self, window: Window) -> int:
        group = {"_id": None, "tokens": _sum("tokensUsed")}
        found = list(self.logs.aggregate([_match(window), {"$group": group}]))
        return int(found[0]["tokens"]) if found else 0

    def last_activity(self, window: Window) -> dict[str, datetime]:
        group = {"_id": "$userId", "last": {"$max": "$createdAt"}}
        return {
            d["_id"]: d["last"]
            for d in self.logs.aggregate([_match(window), WITH_USER, {"$group": group}])
        }
