from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
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


class Gate:
    """Makes ``store.hold_many`` record each batch's request ids, then wait for ``open``."""

    def __init__(self, store: SqliteStore) -> None:
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
