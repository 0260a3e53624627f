from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from burnmeter.config import default_config
from burnmeter.documents import request_log
from burnmeter.exceptions import StoreError
from burnmeter.journal import Journal
from burnmeter.records import UsageRecord
from burnmeter.store import open_store
from burnmeter.store.base import Hold
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from burnmeter.writer import SettlementWriter

POOLS = default_config().pools
OPENHANDS = POOLS["openhands"]
START = Decimal("1000")
FAST = (0.01, 0.05)  # back-off bounds for tests


def settlement(i: int) -> Settlement:
    cost = Decimal(i + 1) / 1000  # distinct costs: a double charge shows in the sum
    log = request_log(
        request_id=f"req-{i}",
        user_id="alice",
        key_mask="sk-burn…ab12",
        model="m",
        usage=UsageRecord(input_tokens=10, output_tokens=5),
        cost=cost,
        billing_tokens=15,
        pool="openhands",
        status_code=200,
        latency_ms=12,
        ttft_ms=None,
        host="chat.example",
        upstream="up.example",
        path="/v1/messages",
        stream=False,
        created_at=datetime.now(UTC),
    )
    return Settlement(f"req-{i}", "alice", "openhands", cost, 15, 10, 5, "sha256:k", log)


def charged(n: int) -> Decimal:
    return sum((settlement(i).cost for i in range(n)), Decimal(0))


def make_store(url: str) -> Store:
    store = open_store(url, POOLS)
    store.ensure_schema(0)
    return store


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'burnmeter.db'}"
    store = make_store(url)
    store.create_user("alice", "sha256:k", {"creditsNew": START})
    store.close()
    return url


@pytest.fixture
def journal(tmp_path: Path) -> Iterable[Journal]:
    with Journal(str(tmp_path / "settlements.journal")) as j:
        yield j


def spent(url: str) -> Decimal:
    store = make_store(url)
    try:
        return START - store.balance("alice", OPENHANDS)
    finally:
        store.close()


def log_count(url: str) -> int:
    store = make_store(url)
    try:
        return len(store.logs(10_000))
    finally:
        store.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class FlakyStore:
    """A store that is down while ``down`` is set (and for the first ``failures`` calls)."""

    def __init__(self, inner: Store, failures: int = 0) -> None:
        self.inner = inner
        self.failures = failures
        self.down = threading.Event()
        self.calls = 0

    def settle(self, settlements: Iterable[Settlement]) -> list[bool]:
        self.calls += 1
        if self.down.is_set() or self.calls <= self.failures:
            raise StoreError("connection refused")
        return self.inner.settle(settlements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RecordingStore:
    """The real store, recording what each ``settle`` was given and answered."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.seen: list[tuple[str, bool]] = []

    def settle(self, settlements: Iterable[Settlement], *args: Any) -> list[bool]:
        given = list(settlements)
        applied = self.inner.settle(given, *args)
        self.seen += [(s.request_id, a) for s, a in zip(given, applied, strict=True)]
        return applied

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_applies_in_order_exactly_once(url: str, journal: Journal) -> None:
    recording = RecordingStore(make_store(url))
    writer = SettlementWriter(lambda: recording, journal, batch_size=7)  # type: ignore[arg-type,return-value]
    writer.start()
    for i in range(50):
        writer.submit(settlement(i))
    assert writer.stop(5) == 0
    assert recording.seen == [(f"req-{i}", True) for i in range(50)]
    assert spent(url) == charged(50)
    assert log_count(url) == 50
    assert os.path.getsize(journal.path) == 0
    store = make_store(url)
    user = store.user("alice")
    store.close()
    assert user is not None
    assert (user["creditsNewUsed"], user["totalInputTokens"]) == (charged(50), 500)


def test_replay_after_crash_does_not_charge_twice(url: str, journal: Journal) -> None:
    """Died after the store committed but before the checkpoint moved: replay is a no-op."""
    for i in range(10):
        journal.append(settlement(i))
    store = make_store(url)
    store.settle(s for _, s in journal.pending(6))  # applied, checkpoint not advanced
    store.close()
    recording = RecordingStore(make_store(url))
    writer = SettlementWriter(lambda: recording, journal)  # type: ignore[arg-type,return-value]
    writer.start()
    assert writer.stop(5) == 0
    assert dict(recording.seen) == {f"req-{i}": i >= 6 for i in range(10)}
    assert spent(url) == charged(10)
    assert log_count(url) == 10


def test_outage_keeps_records_and_applies_them_once(url: str, journal: Journal) -> None:
    flaky = FlakyStore(make_store(url))
    flaky.down.set()
    writer = SettlementWriter(lambda: flaky, journal, backoff=FAST)  # type: ignore[arg-type,return-value]
    writer.start()
    for i in range(20):
        writer.submit(settlement(i))
    wait_for(lambda: not writer.healthy)
    time.sleep(0.1)
    assert writer.backlog == 20
    assert spent(url) == 0
    calls = flaky.calls
    for i in range(20, 100):  # submits must not turn the back-off into a busy retry loop
        writer.submit(settlement(i))
    assert flaky.calls - calls < 10
    flaky.down.clear()
    wait_for(lambda: writer.backlog == 0)
    assert writer.healthy
    assert writer.stop(5) == 0
    assert spent(url) == charged(100)
    assert log_count(url) == 100


def test_first_calls_failing_and_store_factory_failing(url: str, journal: Journal) -> None:
    attempts = []

    def factory() -> Store:
        attempts.append(1)
        if len(attempts) < 3:
            raise StoreError("cannot connect")
        return FlakyStore(make_store(url), failures=3)  # type: ignore[return-value]

    writer = SettlementWriter(factory, journal, backoff=FAST)
    for i in range(5):
        writer.submit(settlement(i))  # before start: applied by the start's replay
    writer.start()
    wait_for(lambda: writer.backlog == 0)
    assert writer.stop(5) == 0
    assert len(attempts) == 3
    assert spent(url) == charged(5)


def test_sqlite_locked_by_another_connection(url: str, journal: Journal) -> None:
    other = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    writer = SettlementWriter(lambda: make_store(url), journal, backoff=FAST)
    writer.start()
    for i in range(10):
        writer.submit(settlement(i))
    time.sleep(0.5)
    assert writer.backlog == 10
    other.execute("ROLLBACK")
    other.close()
    wait_for(lambda: writer.backlog == 0, timeout=15)
    assert writer.stop(5) == 0
    assert spent(url) == charged(10)


def test_stop_is_bounded_and_keeps_the_rest(url: str, tmp_path: Path) -> None:
    path = str(tmp_path / "j")
    flaky = FlakyStore(make_store(url))
    flaky.down.set()
    with Journal(path) as journal:
        writer = SettlementWriter(lambda: flaky, journal, backoff=(5.0, 5.0))  # type: ignore[arg-type,return-value]
        writer.start()
        for i in range(5):
            writer.submit(settlement(i))
        time.sleep(0.05)
        t = time.monotonic()
        assert writer.stop(0.3) == 5
        assert time.monotonic() - t < 1.0
    with Journal(path) as journal:  # the next start applies them
        writer = SettlementWriter(lambda: make_store(url), journal)
        writer.start()
        assert writer.stop(5) == 0
    assert spent(url) == charged(5)


def test_stop_returns_while_the_store_hangs(url: str, journal: Journal) -> None:
    release = threading.Event()

    class Hanging(FlakyStore):
        def settle(self, settlements: Iterable[Settlement]) -> list[bool]:
            release.wait(10)
            return super().settle(settlements)

    writer = SettlementWriter(lambda: Hanging(make_store(url)), journal)  # type: ignore[arg-type,return-value]
    writer.start()
    writer.submit(settlement(0))
    time.sleep(0.05)
    t = time.monotonic()
    assert writer.stop(0.2) == 1
    assert time.monotonic() - t < 0.5
    release.set()


def test_sweep_releases_abandoned_holds_only(url: str, journal: Journal) -> None:
    store = make_store(url)
    for rid in ("abandoned", "journaled", "completed"):
        assert isinstance(store.hold(rid, "alice", OPENHANDS, Decimal(1), Decimal(1)), Hold)
    journal.append(replace(settlement(1), request_id="journaled"))
    store.settle([replace(settlement(2), request_id="completed", log={"_id": "completed"})])
    writer = SettlementWriter(lambda: store, journal, sweep_age=timedelta(seconds=-1))
    writer._sweep(store)
    holds = store.open_holds(datetime.now(UTC) + timedelta(days=1))
    store.close()
    assert [h.request_id for h in holds] == ["journaled"]
    assert spent(url) == 1 + settlement(2).cost


def test_sweep_releases_a_hold_made_after_its_request_settled(url: str, journal: Journal) -> None:
    """Admission gave up waiting for a hold, the request settled without it, then it landed."""
    store = make_store(url)
    store.settle([replace(settlement(3), request_id="late", log={"_id": "late"})])
    assert isinstance(store.hold("late", "alice", OPENHANDS, Decimal(2), Decimal(2)), Hold)
    writer = SettlementWriter(lambda: store, journal, sweep_age=timedelta(seconds=-1))
    writer._sweep(store)
    assert store.open_holds(datetime.now(UTC) + timedelta(days=1)) == []
    store.close()
    assert spent(url) == settlement(3).cost


def test_writer_purges_logs_past_the_ttl(url: str, journal: Journal) -> None:
    store = make_store(url)
    old = settlement(1)
    old.log["createdAt"] = datetime.now(UTC) - timedelta(days=40)
    store.settle([old, settlement(2)])
    store.close()
    writer = SettlementWriter(lambda: make_store(url), journal, log_ttl=timedelta(days=30))
    writer.start()
    wait_for(lambda: log_count(url) == 1)
    writer.stop(5)


def test_sweep_runs_from_the_thread(url: str, journal: Journal) -> None:
    store = make_store(url)
    store.hold("lost", "alice", OPENHANDS, Decimal(7), Decimal(7))
    store.close()
    assert spent(url) == 7
    writer = SettlementWriter(
        lambda: make_store(url), journal, sweep_interval=0.01, sweep_age=timedelta(seconds=-1)
    )
    writer.start()
    wait_for(lambda: spent(url) == 0)
    writer.stop(5)


# -- SIGKILL mid-way ------------------------------------------------------------------------


def _submit_until_killed(url: str, path: str, n: int, acks: Connection) -> None:
    writer = SettlementWriter(lambda: make_store(url), Journal(path), batch_size=16)
    writer.start()
    for i in range(n):
        writer.submit(settlement(i))
        acks.send(i)  # acknowledged: submit returned
        time.sleep(0.0005)
    time.sleep(60)


def test_sigkill_mid_way_loses_and_doubles_nothing(url: str, tmp_path: Path) -> None:
    path = str(tmp_path / "settlements.journal")
    n = 600
    ctx = multiprocessing.get_context("spawn")
    acks_r, acks_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_submit_until_killed, args=(url, path, n, acks_w))
    child.start()
    acked: list[int] = []
    try:
        while len(acked) < n // 2:
            assert acks_r.poll(20), "child stopped acknowledging"
            acked.append(acks_r.recv())
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
    acks_w.close()
    while acks_r.poll(0):
        try:
            acked.append(acks_r.recv())
        except EOFError:
            break
    assert child.exitcode == -signal.SIGKILL
    assert len(acked) < n, "the child finished before it was killed"

    with Journal(path) as journal:  # the dead process's lock is gone
        writer = SettlementWriter(lambda: make_store(url), journal)
        writer.start()
        assert writer.stop(10) == 0
    store = make_store(url)
    logs = store.logs(10_000)
    store.close()
    logged = sorted(int(doc["_id"].removeprefix("req-")) for doc in logs)
    assert len(logged) == len(set(logged))
    assert set(acked) <= set(logged)  # every acknowledged charge is there
    assert logged == list(range(len(logged)))  # submitted in order, nothing skipped
    assert spent(url) == charged(len(logged))  # charged once each: Σ cost = balance change


def test_a_record_the_store_cannot_apply_is_set_aside_not_retried_forever(
    url: str, journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    """E.g. its pool left the config: retrying would block every settlement behind it and
    keep admission thinking the store is down."""
    writer = SettlementWriter(lambda: make_store(url), journal, backoff=FAST)
    writer.start()
    writer.submit(replace(settlement(0), pool="renamed-pool"))
    for i in range(1, 20):
        writer.submit(settlement(i))
    wait_for(lambda: writer.backlog == 0)
    assert writer.healthy and writer.stop(5) == 0
    assert log_count(url) == 19
    rejected = Path(journal.path + ".rejected").read_text()
    assert '"request_id":"req-0"' in rejected and "req-1" not in rejected
    assert "record the store cannot apply" in caplog.text


class SlowStore:
    """A store taking 2 ms a settlement (a MongoDB round trip or two): records keep arriving
    while it settles, so the journal is never found empty."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner

    def settle(self, settlements: Iterable[Settlement]) -> list[bool]:
        batch = list(settlements)
        time.sleep(0.002 * len(batch))
        return self.inner.settle(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_the_sweep_runs_under_a_steady_load_too(url: str, journal: Journal) -> None:
    store = make_store(url)
    store.hold("abandoned", "alice", OPENHANDS, Decimal(5), Decimal(1))
    slow = SlowStore(make_store(url))
    writer = SettlementWriter(
        lambda: slow,  # type: ignore[arg-type,return-value]
        journal,
        sweep_interval=0.05,
        sweep_age=timedelta(seconds=-1),
    )
    writer.start()
    deadline = time.monotonic() + 1.0
    i = 0
    while time.monotonic() < deadline:
        writer.submit(settlement(i))
        i += 1
        time.sleep(0.003)
    still_open = [h.request_id for h in store.open_holds(datetime.now(UTC) + timedelta(days=1))]
    writer.stop(10)
    store.close()
    assert "abandoned" not in still_open


def test_a_record_set_aside_last_does_not_swallow_one_appended_meanwhile(
    url: str, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Setting the journal's last record aside empties (truncates) the journal: a record
    appended right then must not count as applied by the batch that is finishing."""
    set_aside = journal.set_aside

    def then_append(*args: Any) -> None:
        set_aside(*args)
        journal.append(settlement(7))  # the event loop, at that very moment

    monkeypatch.setattr(journal, "set_aside", then_append)
    writer = SettlementWriter(lambda: make_store(url), journal, backoff=FAST)
    writer.submit(settlement(1))
    writer.submit(replace(settlement(2), pool="renamed-pool"))
    writer.start()
    wait_for(lambda: writer.backlog == 0)
    assert writer.stop(5) == 0
    assert log_count(url) == 2, "req-1 and req-7"


def test_on_settled_gets_the_balance_each_applied_settlement_left(
    url: str, journal: Journal
) -> None:
    journal.append(settlement(0))
    store = make_store(url)
    store.settle([settlement(0)])  # applied by an earlier run: not reported again
    store.close()
    seen: list[tuple[str, Decimal]] = []
    writer = SettlementWriter(
        lambda: make_store(url),
        journal,
        batch_size=3,
        on_settled=lambda s, balance: seen.append((s.request_id, balance)),
    )
    writer.start()
    for i in range(1, 8):
        writer.submit(settlement(i))
    assert writer.stop(5) == 0
    assert seen == [(f"req-{i}", START - charged(i + 1)) for i in range(1, 8)]


def test_a_store_without_balances_serves_a_writer_that_wants_none(
    url: str, journal: Journal
) -> None:
    """``settle(batch)`` as before unless ``on_settled`` asks for the balances."""
    writer = SettlementWriter(lambda: FlakyStore(make_store(url)), journal)  # type: ignore[arg-type,return-value]
    writer.start()
    writer.submit(settlement(0))
    assert writer.stop(5) == 0
    assert spent(url) == charged(1)
