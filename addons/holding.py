"""Holds are made on the event loop where nothing can wait, else from one thread, many to a
transaction.

Admission awaits ``HoldQueue.hold``. While no hold is queued or under way on the thread, the
store is asked first to make it at once (``Store.try_hold``: SQLite on a connection that
never waits for a lock, never checkpoints and never syncs; None when it would wait, and
always from MongoDB): such a hold is answered without a loop pass, so no give-up can
overtake it. Otherwise the hold is queued: the thread takes every hold queued since its last
batch, has the store make them in turn (``Store.hold_many``: on SQLite one transaction,
one commit) and hands the outcomes back to the event loop in one wake-up. Under load that
replaces a thread hop, a transaction and a loop wake-up per request with one per batch;
a lone request waits no longer than before (there is no batching window).

Each hold is still atomic and made before its request is forwarded; holds of one batch
are made in arrival order, each seeing the balance the ones before it left.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from burnmeter.exceptions import StoreError
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldOutcome
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import Store

logger = logging.getLogger(__name__)

MAX_BATCH = 64


@dataclass(slots=True)
class _Waiting:
    request: HoldRequest
    future: asyncio.Future[Hold | InsufficientBalance]
    loop: asyncio.AbstractEventLoop


class HoldQueue:
    """``orphaned(hold)`` runs on the event loop for a hold made after its request stopped
    waiting (admission gave up on a slow store): nothing will settle it, so give it back."""

    def __init__(self, store: Store, orphaned: Callable[[Hold], None]) -> None:
        self.store = store
        self.orphaned = orphaned
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._cond = threading.Condition()
        self._busy = 0  # holds taken from the queue, not yet made
        self._idle = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="burnmeter-holds", daemon=True)
        self._thread.start()

    async def hold(self, request: HoldRequest) -> Hold | InsufficientBalance:
        """The store's answer; raises ``StoreError`` (the store failed) or what it raised."""
        with self._cond:
            if self._stopping:
                raise StoreError("shutting down")
            queued = bool(self._queue or self._busy)
        # behind a hold queued earlier it waits its turn: holds are made in arrival order
        outcome = None if queued else self.store.try_hold(request)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome is not None:
            return outcome
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Hold | InsufficientBalance] = loop.create_future()
        with self._cond:
            if self._stopping:
                raise StoreError("shutting down")
            self._queue.append(_Waiting(request, future, loop))
            if self._idle:
                self._cond.notify()
        try:
            return await future
        except asyncio.CancelledError:
            # Given up (a timeout) in the very loop pass that brought the answer: _answer
            # found the future still waiting, so the hold is handed back here.
            if future.done() and not future.cancelled() and future.exception() is None:
                outcome = future.result()
                if isinstance(outcome, Hold):
                    self.orphaned(outcome)
            raise

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until every queued hold is made (shutdown)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    return

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._idle = True
                while not self._queue and not self._stopping:
                    self._cond.wait()
                self._idle = False
                if not self._queue:
                    return
                taken = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
                # Requests that gave up waiting (a slow store) need no hold; reading done()
                # from this thread may miss a late give-up, which _answer then handles.
                batch = [w for w in taken if not w.future.done()]
                self._busy = len(batch)
            outcomes = self._make(batch) if batch else []
            with self._cond:
                # made (committed): a hold that comes now may be made on the loop, after
                # these in any case; reset before the answers go out, which may bring it
                self._busy = 0
                self._cond.notify_all()
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Waiting, object]]] = {}
            for waiting, outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(waiting.loop, []).append((waiting, outcome))
            for loop, answers in by_loop.items():
                try:
                    loop.call_soon_threadsafe(self._answer, answers)
                except RuntimeError:  # the loop is closed: nobody waits, the sweep releases
                    pass

    def _make(self, batch: list[_Waiting]) -> list[HoldOutcome | BaseException]:
        try:
            outcomes: list[HoldOutcome | BaseException] = []
            outcomes += self.store.hold_many([w.request for w in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} holds")
            return outcomes
        except Exception as e:  # not an outage: the store did something unexpected
            logger.exception("metering: holds failed")
            return [e] * len(batch)

    def _answer(self, answers: list[tuple[_Waiting, object]]) -> None:
        """On the event loop: wake each waiting request with its outcome."""
        for waiting, outcome in answers:
            if waiting.future.done():  # it stopped waiting
                if isinstance(outcome, Hold):
                    self.orphaned(outcome)
            elif isinstance(outcome, BaseException):
                waiting.future.set_exception(outcome)
            else:
                assert isinstance(outcome, Hold | InsufficientBalance)
                waiting.future.set_result(outcome)
