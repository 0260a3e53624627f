"""Settlements leave the event loop through one bounded queue and one writer thread.

``submit`` never blocks: hooks call it and return. The writer thread takes what is queued,
up to ``BATCH`` at a time, and applies it with one ``store.settle`` call. A store outage
keeps the batch and retries it with backoff until the store is back (settling is
idempotent by request id), so money is not lost while the store is down; ``stop`` drains
the queue, with one last attempt if the store is still down.

Queue-full policy: nothing ever blocks the proxy. Admission stops taking new metered
requests (503) once the queue is half full (``backlogged``), which leaves the other half
for the requests already in flight. A settlement that still finds the queue full, or is
left over when the store stays down through shutdown, is *spilled*: logged at ERROR as one
JSON line (no raw key) for an operator to replay; its hold stays open for the hold sweep.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import asdict

from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from burnmeter.store.base import StoreError

logger = logging.getLogger(__name__)

BATCH = 100
RETRY_SECONDS = (0.5, 1, 2, 5, 10, 30)  # then every 30 s
_STOP = object()


def spill(settlement: Settlement, why: str) -> None:
    record = asdict(settlement)
    record.pop("key_doc_id")  # may be the raw key (legacy user_keys documents)
    logger.error("metering: settlement spilled (%s): %s", why, json.dumps(record, default=str))


class SettlementWriter:
    def __init__(self, store: Store, maxsize: int) -> None:
        self.store = store
        self.maxsize = maxsize
        self.queue: queue.Queue[Settlement | object] = queue.Queue(maxsize)
        self.written = 0
        self.spilled = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metering-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def backlogged(self) -> bool:
        return self.queue.qsize() >= self.maxsize // 2

    def submit(self, settlement: Settlement) -> bool:
        """Queue a settlement for the writer; spill it (False) if the queue is full."""
        try:
            self.queue.put_nowait(settlement)
        except queue.Full:
            self.spilled += 1
            spill(settlement, "queue full")
            return False
        return True

    def stop(self, timeout: float = 30) -> None:
        """Write what is queued, then end the thread (waits up to ``timeout`` seconds)."""
        self._stopping.set()
        self.queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("metering: writer still busy after %ss, giving up on it", timeout)
        logger.info("metering: wrote %d settlements, spilled %d", self.written, self.spilled)

    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[Settlement] = []
            item = self.queue.get()
            while item is not _STOP:
                assert isinstance(item, Settlement)
                batch.append(item)
                if len(batch) >= BATCH:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is _STOP
            if batch:
                self._write(batch)

    def _write(self, batch: list[Settlement]) -> None:
        attempt = 0
        while True:
            try:
                applied = self.store.settle(batch)
            except StoreError as e:
                if self._stopping.is_set():
                    logger.error("metering: store unavailable at shutdown: %s", e)
                    break
                delay = RETRY_SECONDS[min(attempt, len(RETRY_SECONDS) - 1)]
                attempt += 1
                logger.warning("metering: store unavailable (%s), retrying in %ss", e, delay)
                self._stopping.wait(delay)
                continue
            except Exception:
                logger.exception("metering: settling %d requests failed", len(batch))
                break
            self.written += len(batch)
            if duplicates := len(applied) - sum(applied):
                logger.info("metering: %d settlements were already applied", duplicates)
            return
        for settlement in batch:
            self.spilled += 1
            spill(settlement, "not written")
