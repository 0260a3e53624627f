"""Spend reports over either store: ``reports_for(store).summary(window)`` and friends."""

from __future__ import annotations

from burnmeter.reports.base import OriginalPools
from burnmeter.reports.base import Reports
from burnmeter.store.base import Store


def reports_for(store: Store) -> Reports:
    """The reports answered by the store's own server (SQL or aggregation pipelines)."""
    from burnmeter.store.sqlite import SqliteStore

    legacy = OriginalPools.of(store.pools).legacy

    if isinstance(store, SqliteStore):
        from burnmeter.reports.sqlite import SqliteReports

        return Reports(SqliteReports(store.connection(), legacy), store.pools)
    from burnmeter.store.mongo import MongoStore

    if isinstance(store, MongoStore):
        from burnmeter.reports.mongo import MongoReports

        return Reports(MongoReports(store.db, legacy), store.pools)
    raise TypeError(f"no reports for {type(store).__name__}")
