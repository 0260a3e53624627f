"""``Store.settle``'s committed balances and ``Store.probe_write``, on every backend."""

from __future__ import annotations

import random
import sqlite3
from decimal import Decimal as D

import pytest
from stores import POOLS
from stores import unreachable_mongo_store
from test_store_contract import alice
from test_store_contract import settlement

from burnmeter.exceptions import StoreError
from burnmeter.store.base import Store
from burnmeter.store.base import committed
from burnmeter.store.sqlite import SqliteStore

OPENHANDS = POOLS["openhands"]
OHMYGPT = POOLS["ohmygpt"]


def test_committed_adds_open_holds() -> None:
    assert committed([D("1.5"), D("-0.5")], [D("0.25")]) == D("1.25")
    assert committed([], []) == 0


def test_settle_reports_the_balance_each_settlement_left(store: Store) -> None:
    alice(store, creditsNew="10")
    store.hold("r1", "alice", OPENHANDS, D(3), D(1))
    store.hold("r2", "alice", OPENHANDS, D(2), D(1))
    store.hold("other-pool", "alice", OHMYGPT, D(0), D(0))  # refused: no ohmygpt credits
    balances: dict[str, D] = {}
    # in one batch, each settlement sees the ones before it; open holds count as not spent
    assert store.settle([settlement("r1", "1.25"), settlement("r2", "0.5")], balances) == [
        True,
        True,
    ]
    assert balances == {"r1": D("8.75"), "r2": D("8.25")}
    assert store.balance("alice", OPENHANDS) == D("8.25")


def test_settle_reports_nothing_for_a_settlement_already_applied(store: Store) -> None:
    alice(store, creditsNew="10")
    store.settle([settlement("r1", "1")])
    balances: dict[str, D] = {}
    assert store.settle([settlement("r1", "1")], balances) == [False]
    assert balances == {}


def test_committed_balance_drops_by_each_cost_whatever_the_holds(store: Store) -> None:
    """Holds and releases leave it alone: the writer's ``before = after + cost`` is exact."""
    alice(store, credits="3", refCredits="2")
    rng = random.Random(7)
    open_ids: list[str] = []
    expected = D(5)
    for i in range(40):
        request_id = f"r{i}"
        store.hold(request_id, "alice", OHMYGPT, D(rng.randint(1, 90)) / 100, D("0.01"))
        open_ids.append(request_id)
        if rng.random() < 0.5:
            done = open_ids.pop(rng.randrange(len(open_ids)))
            cost = D(rng.randint(0, 60)) / 100
            balances: dict[str, D] = {}
            store.settle([settlement(done, str(cost), pool="ohmygpt")], balances)
            expected -= cost
            assert balances == {done: expected}


def test_probe_write_passes_on_a_working_store(store: Store) -> None:
    store.probe_write(0.5)


def test_probe_write_fails_while_sqlite_is_write_locked(tmp_path) -> None:
    path = tmp_path / "locked.db"
    store = SqliteStore(path, POOLS)
    store.ensure_schema(0)
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match="locked"):
            store.probe_write(0.05)
        store.user("alice")  # reads still work: readiness is about writes
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    store.probe_write(0.05)
    store.close()


def test_probe_write_does_not_create_a_missing_file(tmp_path) -> None:
    store = SqliteStore(tmp_path / "missing.db", POOLS)
    with pytest.raises(StoreError):
        store.probe_write(0.05)
    assert not (tmp_path / "missing.db").exists()


def test_probe_write_fails_when_mongodb_is_unreachable() -> None:
    store = unreachable_mongo_store()
    try:
        with pytest.raises(StoreError, match="MongoDB"):
            store.probe_write(0.1)
    finally:
        store.close()
