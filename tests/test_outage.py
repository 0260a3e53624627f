"""addons/outage.py: whether the store is down and the journal has room, asked directly."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy.test import tflow

from addons import errors
from addons.outage import RECORD_RESERVE
from addons.outage import STORE_RETRY
from addons.outage import STORE_TIMEOUT
from addons.outage import Outage
from burnmeter.exceptions import JournalError
from burnmeter.exceptions import StoreError
from burnmeter.journal import Journal
from burnmeter.writer import SettlementWriter
from tests.addon_support import FullDisk
from tests.test_journal import settlement


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    journal = Journal(str(tmp_path / "burnmeter.journal"), 4 * RECORD_RESERVE)
    yield journal
    journal.close()


@pytest.fixture
def writer(journal: Journal) -> SettlementWriter:
    """A writer that is never started: the outage reads its health and its journal."""

    def no_store() -> None:
        raise AssertionError("the outage never opens the store")

    return SettlementWriter(no_store, journal)  # type: ignore[arg-type]


@pytest.fixture
def outage(writer: SettlementWriter) -> Outage:
    return Outage(writer, weakref.WeakSet())


class Clock:
    """``time.monotonic`` as the test sets it (the outage's and the writer's)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = time.monotonic()
        monkeypatch.setattr(time, "monotonic", lambda: self.now)


def test_a_failed_call_marks_the_store_down_for_store_retry(
    outage: Outage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(monkeypatch)
    assert not outage.store_down
    with caplog.at_level(logging.WARNING, logger="addons.outage"):
        outage.mark_down(StoreError("connection refused"))
        clock.now += STORE_RETRY / 2
        outage.mark_down(StoreError("still refused"))  # down already: said once
    assert outage.store_down
    assert [r.getMessage() for r in caplog.records] == [
        "metering: store unavailable for admission: connection refused"
    ]
    clock.now += STORE_RETRY - 0.01
    assert outage.store_down, "each failure marks it down again for the whole retry time"
    clock.now += 0.02
    assert not outage.store_down


def test_a_stalled_writer_marks_the_store_down(
    outage: Outage, writer: SettlementWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer.healthy = False  # its last store call failed
    assert outage.store_down
    writer.healthy = True
    assert not outage.store_down
    clock = Clock(monkeypatch)
    monkeypatch.setattr(writer, "_settling_since", clock.now)  # one settlement under way
    clock.now += STORE_TIMEOUT
    assert not outage.store_down, "no longer than one store call"
    clock.now += 0.01
    assert outage.store_down


def in_flight(n: int) -> list[http.HTTPFlow]:
    return [tflow.tflow() for _ in range(n)]


def test_the_journal_keeps_room_for_each_request_in_flight(
    outage: Outage, journal: Journal
) -> None:
    room = journal.max_bytes // RECORD_RESERVE  # requests the empty journal has room for
    flows = in_flight(room - 1)
    outage.in_flight.update(flows)
    assert outage.journal_has_room() and outage.refusal() is None, "the last one"
    flows.append(tflow.tflow())
    outage.in_flight.add(flows[-1])
    assert not outage.journal_has_room()
    refusal = outage.refusal()
    assert refusal is not None and refusal.problem is errors.UNAVAILABLE
    assert refusal.message == "Metering store unreachable and journal full, retry later"
    outage.in_flight.discard(flows.pop())  # settled
    assert outage.journal_has_room()
    journal.append(settlement(1))  # a record waiting for the store takes its room
    assert journal.size > 0 and not outage.journal_has_room()


def test_a_journal_that_cannot_be_written_refuses_until_a_probe_write_succeeds(
    outage: Outage, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = FullDisk(journal, monkeypatch)
    with pytest.raises(JournalError):
        journal.append(settlement(1))
    refusal = outage.refusal()
    assert refusal is not None and refusal.problem is errors.UNAVAILABLE
    assert refusal.message == "Metering journal cannot be written, retry later"
    disk.full = False
    assert outage.refusal() is None
    assert journal.failing is None
