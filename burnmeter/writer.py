"""The one writer thread: applies journaled settlements to the store, in order, once.

The event loop calls ``submit`` (a journal append, then a wake-up) and never waits on the
store. The thread reads a batch past the journal's checkpoint, settles it (idempotent by
request id), then advances the checkpoint. When the store fails, the records stay in the
journal and the batch is retried with back-off: a crash or an outage at any point can
make a batch be applied again, never lost, and the store charges it once.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal

from burnmeter.exceptions import StoreError
from burnmeter.journal import Journal
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store

logger = logging.getLogger(__name__)

OnSettled = Callable[[Settlement, Decimal], None]

CHECKPOINT_INTERVAL = 1.0
"""Seconds between checkpoint writes while the journal is never caught up (under load): a
crash replays at most about this much of settlements already applied (charged once)."""


class SettlementWriter:
    """``store_factory`` runs in the writer thread (SQLite connections are per thread).

    So does ``on_settled(settlement, balance)``, after the checkpoint moved, for each record
    this writer applied (not one the store already had), with its pool's committed balance
    right after it (``Store.settle``'s ``balances``); it must not block.

    ``backlog`` and ``healthy`` are for admission decisions and the status line. Every
    ``sweep_interval`` seconds, holds older than ``sweep_age`` whose request has no journaled
    record are released: the process died mid-request, or a hold that admission gave up
    waiting for was made after its request settled without it. ``sweep_age`` must exceed
    the longest request. With ``log_ttl`` (stores without a TTL index), logs older than
    that are purged every ``purge_interval`` seconds. A batch gathers for up to
    ``batch_window`` seconds, so one transaction and one checkpoint serve many requests.
    """

    def __init__(
        self,
        store_factory: Callable[[], Store],
        journal: Journal,
        *,
        batch_size: int = 200,
        batch_window: float = 0.02,
        on_settled: OnSettled | None = None,
        backoff: tuple[float, float] = (0.2, 5.0),
        sweep_interval: float = 60.0,
        sweep_age: timedelta = timedelta(hours=1),
        log_ttl: timedelta | None = None,
        purge_interval: float = 3600.0,
    ) -> None:
        self.journal = journal
        self.healthy = True  # the last store call succeeded
        self._store_factory = store_factory
        self._batch_size = batch_size
        self._batch_window = batch_window
        self._on_settled = on_settled
        self._backoff_min, self._backoff_max = backoff
        self._sweep_interval = sweep_interval
        self._sweep_age = sweep_age
        self._log_ttl = log_ttl
        self._purge_interval = purge_interval
        self._wake = threading.Event()
        self._stopping = False
        self._kick = threading.Event()  # cuts a back-off short on stop; submits do not
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._settling_since: float | None = None  # monotonic, while store.settle runs
        self._next_checkpoint = 0.0  # monotonic: a partial advance persists from then on

    @property
    def backlog(self) -> int:
        """Settlements submitted (or left by an earlier run) and not yet applied."""
        return self.journal.backlog

    def stalled(self, after: float) -> bool:
        """Settlements are not getting through: the last attempt failed, or one has been
        waiting on the store for more than ``after`` seconds (a lock, a hung server)."""
        since = self._settling_since
        return not self.healthy or (since is not None and time.monotonic() - since > after)

    def start(self) -> None:
        """Start the thread; it first applies what an earlier run left in the journal."""
        if self.journal.backlog:
            logger.info("%s: replaying %d settlements", self.journal.path, self.journal.backlog)
        self._thread = threading.Thread(target=self._run, name="burnmeter-writer", daemon=True)
        self._thread.start()

    def submit(self, settlement: Settlement) -> Future[None]:
        """Journal one settlement (raises ``JournalFull``); cheap, safe on the event loop.
        The future is done once the record is durable (``Journal.append``)."""
        synced = self.journal.append(settlement)
        self._wake.set()
        return synced

    def stop(self, timeout: float) -> int:
        """Apply what can be applied within ``timeout`` seconds; returns what is left.

        What is left stays in the journal for the next ``start``."""
        self._deadline = time.monotonic() + timeout
        self._stopping = True
        self._kick.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        left = self.journal.backlog
        if left:
            logger.warning("%s: %d settlements left for the next start", self.journal.path, left)
        return left

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        store: Store | None = None
        delay = self._backoff_min
        next_sweep = time.monotonic() + self._sweep_interval
        next_purge = time.monotonic() if self._log_ttl else float("inf")
        while not (self._stopping and (not self.journal.backlog or self._past_deadline())):
            if not self._stopping and 0 < self.journal.backlog < self._batch_size:
                # group commit: one store transaction and one checkpoint for many requests
                self._kick.wait(self._batch_window)
            self._wake.clear()
            try:
                if store is None:
                    store = self._store_factory()
                batch = self.journal.pending(self._batch_size)
                balances: dict[str, Decimal] | None = {} if self._on_settled else None
                if batch:
                    self._settling_since = time.monotonic()
                    try:
                        self._settle(store, batch, balances)
                    finally:
                        self._settling_since = None
                # also under a steady load, when the journal is never found empty
                if time.monotonic() >= next_sweep and not self._stopping:
                    self._sweep(store)
                    next_sweep = time.monotonic() + self._sweep_interval
                if time.monotonic() >= next_purge and not self._stopping:
                    self._purge(store)
                    next_purge = time.monotonic() + self._purge_interval
            except Exception as e:
                if self.healthy:
                    logger.warning(
                        "cannot apply settlements, they wait in the journal: %s",
                        e,
                        exc_info=not isinstance(e, StoreError),
                    )
                self.healthy = False
                self._kick.wait(min(delay, self._remaining()))
                self._kick.clear()
                delay = min(delay * 2, self._backoff_max)
                continue
            if not self.healthy:
                logger.info("store available again: %d settlements pending", self.backlog)
            self.healthy = True
            delay = self._backoff_min
            if not batch:
                due = min(next_sweep, next_purge) - time.monotonic()
                self._wake.wait(min(max(0.0, due), self._remaining()))
                continue
            if self._on_settled is not None and balances:
                for _, settlement in batch:
                    if settlement.request_id in balances:
                        try:
                            self._on_settled(settlement, balances[settlement.request_id])
                        except Exception:
                            logger.exception("on_settled failed for %s", settlement.request_id)
        if store is not None:
            store.close()

    def _settle(
        self,
        store: Store,
        batch: list[tuple[int, Settlement]],
        balances: dict[str, Decimal] | None = None,
    ) -> None:
        """Apply a batch, then advance the journal past it.

        A failure that is no outage (``StoreError``) is a record the store can never apply
        (e.g. its pool left the config): retrying would block every record behind it, so
        the batch is applied one record at a time and such a record is set aside
        (``Journal.set_aside``, which advances past it), logged at ERROR for an operator."""
        try:
            self._apply(store, [s for _, s in batch], balances)
        except StoreError:
            raise
        except Exception:
            logger.warning("a batch of settlements failed: applying them one by one")
        else:
            self._advance(batch[-1][0])
            return
        set_aside = False
        for end, settlement in batch:
            set_aside = False
            try:
                self._apply(store, [settlement], balances)
            except StoreError:
                raise
            except Exception as e:
                self.journal.set_aside(end, settlement, e)
                set_aside = True
        # Setting the last record aside advanced past it, and may have emptied the journal:
        # advancing again to an offset from before would cover records appended since.
        if not set_aside:
            self._advance(batch[-1][0])

    def _advance(self, offset: int) -> None:
        """``Journal.advance``, persisting a checkpoint short of the journal's end at most
        every ``CHECKPOINT_INTERVAL`` (a caught-up journal is emptied every time)."""
        now = time.monotonic()
        persist = self._stopping or now >= self._next_checkpoint
        self.journal.advance(offset, persist=persist)
        if persist:
            self._next_checkpoint = now + CHECKPOINT_INTERVAL

    @staticmethod
    def _apply(
        store: Store, settlements: list[Settlement], balances: dict[str, Decimal] | None
    ) -> None:
        """``Store.settle``, asking for the balances only when ``on_settled`` wants them."""
        if balances is None:
            store.settle(settlements)
        else:
            store.settle(settlements, balances)

    def _past_deadline(self) -> bool:
        return time.monotonic() >= self._deadline

    def _remaining(self) -> float:
        return (
            max(0.0, self._deadline - time.monotonic()) if self._stopping else threading.TIMEOUT_MAX
        )

    def _sweep(self, store: Store) -> None:
        """Release holds that no settlement will close.

        Settling removes a request's hold, so an old hold is either pending in the journal
        or abandoned: its process died mid-request, or it was made after its request had
        settled without one (admission stopped waiting for a slow store). A logged request
        with a hold is that second case: the settlement charged the balance directly.
        """
        holds = store.open_holds(older_than=datetime.now(UTC) - self._sweep_age)
        if not holds:
            return
        pending = {s.request_id for _, s in self.journal.pending(sys.maxsize)}
        released = 0
        for hold in holds:
            if hold.request_id not in pending:
                released += store.release(hold)
        if released:
            logger.info("released %d abandoned holds older than %s", released, self._sweep_age)

    def _purge(self, store: Store) -> None:
        assert self._log_ttl is not None
        if purged := store.purge_logs(datetime.now(UTC) - self._log_ttl):
            logger.info("purged %d request logs older than %s", purged, self._log_ttl)
