from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextlib import nullcontext
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from stores import POOLS

from addons.holding import HoldQueue
from burnmeter.documents import utcnow
from burnmeter.exceptions import StoreError
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.sqlite import SqliteStore

OPENHANDS = POOLS["openhands"]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    store = SqliteStore(tmp_path / "holds.db", POOLS)
    store.ensure_schema(0)
    store.create_user("alice", "sk-alice", {"creditsNew": Decimal(10)})
    yield store
    store.close()


def wanted(i: int, amount: int = 1) -> HoldRequest:
    return HoldRequest(f"r{i}", "alice", OPENHANDS, Decimal(amount), Decimal(amount))


def thread_only(store: SqliteStore) -> None:
    """Every hold goes to the hold thread (as a store that cannot try does)."""
    store.try_hold = lambda request: None  # type: ignore[method-assign]


class Gate:
    """Makes ``store.hold_many`` record each batch's request ids, then wait for ``open``.
    ``on_loop``: the store still tries each hold on the event loop first."""

    def __init__(self, store: SqliteStore, *, on_loop: bool = False) -> None:
        if not on_loop:
            thread_only(store)
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        hold_many = store.hold_many

        def gated(requests):  # type: ignore[no-untyped-def]
            self.batches.append([r.request_id for r in requests])
            self.entered.set()
            self.opened.wait(5)
            return hold_many(requests)

        store.hold_many = gated  # type: ignore[method-assign]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 5)


async def test_holds_queued_meanwhile_are_made_in_one_batch(store: SqliteStore) -> None:
    gate = Gate(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    first = asyncio.ensure_future(queue.hold(wanted(0)))
    await gate.wait_entered()
    rest = [asyncio.ensure_future(queue.hold(wanted(i, 2))) for i in range(1, 7)]
    await asyncio.sleep(0.05)  # all six are queued while the first batch is under way
    gate.opened.set()
    outcomes = await asyncio.gather(first, *rest)
    queue.stop(5)
    assert [len(batch) for batch in gate.batches] == [1, 6]
    # in arrival order: 1 + 2 * 4 = 9 of the 10 are held, then two refusals
    assert [type(o) for o in outcomes] == [Hold] * 5 + [InsufficientBalance] * 2
    assert outcomes[-1] == InsufficientBalance(Decimal(1))
    assert store.balance("alice", OPENHANDS) == 1


async def test_a_failing_store_fails_every_waiting_hold(store: SqliteStore) -> None:
    def down(requests):  # type: ignore[no-untyped-def]
        raise StoreError("database is locked")

    store.hold_many = down  # type: ignore[method-assign]
    thread_only(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    outcomes = await asyncio.gather(
        *(queue.hold(wanted(i)) for i in range(3)), return_exceptions=True
    )
    queue.stop(5)
    assert all(isinstance(o, StoreError) for o in outcomes)


async def test_a_hold_nobody_waits_for_is_handed_back(store: SqliteStore) -> None:
    orphans: list[Hold] = []
    gate = Gate(store)
    queue = HoldQueue(store, orphaned=orphans.append)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await queue.hold(wanted(0, 3))
    gate.opened.set()
    for _ in range(200):
        if orphans:
            break
        await asyncio.sleep(0.01)
    queue.stop(5)
    assert [h.request_id for h in orphans] == ["r0"] and orphans[0].amount == 3


async def test_drain_waits_for_queued_holds_and_stop_makes_them(store: SqliteStore) -> None:
    thread_only(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    waiting = [asyncio.ensure_future(queue.hold(wanted(i))) for i in range(5)]
    await asyncio.sleep(0)  # queued
    queue.drain(5)  # blocks the loop, as done() does: the holds are made, not yet answered
    assert len(store.open_holds(utcnow() + timedelta(days=1))) == 5
    queue.stop(5)
    assert all(isinstance(o, Hold) for o in await asyncio.gather(*waiting))
    with pytest.raises(StoreError, match="shutting down"):
        await queue.hold(wanted(9))


async def test_holds_given_up_while_queued_are_not_made(store: SqliteStore) -> None:
    gate = Gate(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    first = asyncio.ensure_future(queue.hold(wanted(0)))
    await gate.wait_entered()
    gave_up = asyncio.ensure_future(queue.hold(wanted(1)))
    await asyncio.sleep(0)
    gave_up.cancel()
    waits = asyncio.ensure_future(queue.hold(wanted(2)))
    await asyncio.sleep(0)
    gate.opened.set()
    assert isinstance(await first, Hold) and isinstance(await waits, Hold)
    queue.stop(5)
    assert gate.batches == [["r0"], ["r2"]]


async def test_a_hold_answered_in_the_pass_its_request_gives_up_is_handed_back(
    store: SqliteStore,
) -> None:
    orphans: list[Hold] = []
    thread_only(store)
    queue = HoldQueue(store, orphaned=orphans.append)

    async def held() -> Hold | InsufficientBalance:
        async with asyncio.timeout(0.2):
            return await queue.hold(wanted(0, 3))

    task = asyncio.ensure_future(held())
    await asyncio.sleep(0)  # queued: the thread makes the hold at once
    time.sleep(0.5)  # the loop is busy: the answer and the timeout land in one pass
    with pytest.raises(TimeoutError):
        await task
    queue.stop(5)
    assert [h.request_id for h in orphans] == ["r0"]


# -- on the event loop, where nothing can wait ----------------------------------------


class Spy:
    """Counts the holds the hold thread makes (``store.hold_many``)."""

    def __init__(self, store: SqliteStore) -> None:
        self.through_thread: list[str] = []
        hold_many = store.hold_many

        def counted(requests):  # type: ignore[no-untyped-def]
            self.through_thread += [r.request_id for r in requests]
            return hold_many(requests)

        store.hold_many = counted  # type: ignore[method-assign]


@contextmanager
def write_locked(path: str) -> Iterator[sqlite3.Connection]:
    """Another connection holds SQLite's write lock meanwhile."""
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        yield locker
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()


async def test_a_hold_is_made_on_the_loop_when_nothing_waits(store: SqliteStore) -> None:
    spy = Spy(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    hold = await queue.hold(wanted(0, 3))
    queue.stop(5)
    assert isinstance(hold, Hold) and hold.amount == 3 and spy.through_thread == []
    other = SqliteStore(store.path, POOLS)  # committed: another connection sees it
    assert other.balance("alice", OPENHANDS) == 7
    assert [h.request_id for h in other.open_holds(utcnow() + timedelta(days=1))] == ["r0"]
    other.close()


async def test_a_locked_store_falls_back_to_the_thread_without_blocking_the_loop(
    store: SqliteStore,
) -> None:
    spy = Spy(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    with write_locked(store.path) as locker:
        start = time.perf_counter()
        task = asyncio.ensure_future(queue.hold(wanted(0, 3)))
        await asyncio.sleep(0)  # the attempt ran and gave way to the thread
        blocked = time.perf_counter() - start
        assert not task.done()
        locker.execute("ROLLBACK")
    hold = await task
    queue.stop(5)
    # the lock outlives the measurement: an attempt that waited would take busy_timeout (10 s)
    assert blocked < 1.0
    assert isinstance(hold, Hold) and hold.amount == 3 and spy.through_thread == ["r0"]
    assert store.balance("alice", OPENHANDS) == 7


async def test_holds_behind_a_queued_hold_wait_their_turn(store: SqliteStore) -> None:
    gate = Gate(store, on_loop=True)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    with write_locked(store.path):
        first = asyncio.ensure_future(queue.hold(wanted(0, 6)))
        await gate.wait_entered()
    # the store takes writes again, but the first hold is still under way on the thread
    second = asyncio.ensure_future(queue.hold(wanted(1, 6)))
    await asyncio.sleep(0)
    gate.opened.set()
    outcomes = await asyncio.gather(first, second)
    queue.stop(5)
    assert gate.batches == [["r0"], ["r1"]]
    assert isinstance(outcomes[0], Hold) and outcomes[1] == InsufficientBalance(Decimal(4))


async def test_a_durable_store_holds_through_the_thread(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "durable.db", POOLS, durable=True)
    store.ensure_schema(0)
    store.create_user("alice", "sk-alice", {"creditsNew": Decimal(10)})
    spy = Spy(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    hold = await queue.hold(wanted(0, 3))
    queue.stop(5)
    store.close()
    assert isinstance(hold, Hold) and spy.through_thread == ["r0"]


async def test_a_replaced_store_file_is_a_store_error_on_the_loop(store: SqliteStore) -> None:
    spy = Spy(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    assert isinstance(await queue.hold(wanted(0)), Hold)  # the loop's connection is open
    replacement = Path(store.path).with_name("other.db")
    sqlite3.connect(replacement).close()
    os.replace(replacement, store.path)
    with pytest.raises(StoreError, match="deleted or replaced"):
        await queue.hold(wanted(1))
    queue.stop(5)
    assert spy.through_thread == []


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    holds=st.lists(
        st.tuples(st.integers(0, 6), st.integers(0, 6)).map(sorted), min_size=1, max_size=12
    )
)
async def test_on_the_loop_or_through_the_thread_the_answers_are_the_same(
    tmp_path: Path, holds: list[list[int]]
) -> None:
    answers = []
    for on_loop in (True, False):
        with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
            store = SqliteStore(Path(tmp) / "holds.db", POOLS)
            store.ensure_schema(0)
            store.create_user("alice", "sk-alice", {"creditsNew": Decimal(10)})
            spy = Spy(store)
            if not on_loop:
                thread_only(store)
            queue = HoldQueue(store, orphaned=lambda hold: None)
            outcomes = []
            for i, (minimum, amount) in enumerate(holds):
                request = HoldRequest(
                    f"r{i}", "alice", OPENHANDS, Decimal(amount), Decimal(minimum)
                )
                outcomes.append(await queue.hold(request))
            queue.stop(5)
            store.close()
        assert len(spy.through_thread) == (0 if on_loop else len(holds))
        answers.append(
            [o.amount if isinstance(o, Hold) else o for o in outcomes]  # ids and times differ
        )
    assert answers[0] == answers[1]


async def test_concurrent_holds_on_and_off_the_loop_never_overdraw(store: SqliteStore) -> None:
    """Waves of 20 tasks at once, every other wave while another connection holds the write
    lock (those go to the thread): together they hold at most the balance, and never more."""
    store.topup("alice", "creditsNew", Decimal(190))
    spy = Spy(store)
    queue = HoldQueue(store, orphaned=lambda hold: None)
    outcomes: list[Hold | InsufficientBalance] = []
    for wave in range(10):
        with write_locked(store.path) if wave % 2 else nullcontext() as locker:
            tasks = [
                asyncio.ensure_future(queue.hold(wanted(wave * 20 + i, 1 + i % 3)))
                for i in range(20)
            ]
            await asyncio.sleep(0)  # each tried, on the loop or in vain
            if locker is not None:
                locker.execute("ROLLBACK")
        outcomes += await asyncio.gather(*tasks)
    queue.stop(5)
    held = [o for o in outcomes if isinstance(o, Hold)]
    assert sum(h.amount for h in held) + store.balance("alice", OPENHANDS) == 200
    assert 0 <= store.balance("alice", OPENHANDS) < 3  # the balance ran out, not below zero
    assert len(spy.through_thread) == 100  # the locked waves
    assert isinstance(outcomes[0], Hold) and isinstance(outcomes[-1], InsufficientBalance)
