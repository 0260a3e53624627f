"""SQLite only: the schema other code writes SQL against, and several processes at once."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal as D
from pathlib import Path

import pytest
from stores import POOLS

from burnmeter.config import Pool
from burnmeter.documents import utcnow
from burnmeter.exceptions import StoreError
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import Settlement
from burnmeter.store.sqlite import SqliteStore

OPENHANDS = POOLS["openhands"]


def open_store(path: Path) -> SqliteStore:
    store = SqliteStore(path, POOLS)
    store.ensure_schema(0)
    return store


def test_columns_and_encodings(tmp_path: Path) -> None:
    store = open_store(tmp_path / "b.db")
    store.import_user({"_id": "u", "creditsNew": 1.5, "createdAt": {"$date": 1700000000123}})
    store.import_log({"_id": {"$oid": "65a1b2c3d4e5f60718293a4b"}, "creditsCost": 0.25})
    db = sqlite3.connect(tmp_path / "b.db")
    columns = [row[1] for row in db.execute("PRAGMA table_info(usersNew)")]
    assert columns[:20] == [
        "_id", "isActive", "role", "apiKey", "credits", "refCredits", "creditsUsed",
        "creditsNew", "creditsNewUsed", "tokensUserNew", "totalInputTokens",
        "totalOutputTokens", "expiresAt", "expiresAtNew", "createdAt", "purchasedAt",
        "purchasedAtNew", "lastLoginAt", "apiKeyCreatedAt", "extra",
    ]  # fmt: skip
    assert db.execute("SELECT creditsNew, createdAt, credits FROM usersNew").fetchone() == (
        1_500_000_000,
        1700000000123,
        None,
    )
    assert db.execute("SELECT _id, creditsCost FROM request_logs").fetchone() == (
        "65a1b2c3d4e5f60718293a4b",
        250_000_000,
    )
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    store.close()


def test_pool_fields_become_columns(tmp_path: Path) -> None:
    pools = {
        **POOLS,
        "gold": Pool(name="gold", balance=["gold"], used="goldUsed", tokens="goldTokens"),
    }
    store = SqliteStore(tmp_path / "b.db", pools)
    store.ensure_schema(0)
    store.ensure_schema(0)
    store.create_user("u", "k", {"gold": D(2)})
    store.settle([Settlement("r", "u", "gold", D("0.5"), 7, 1, 2, "k")])
    user = store.user("u")
    assert user is not None
    assert (user["gold"], user["goldUsed"], user["goldTokens"]) == (D("1.5"), D("0.5"), 7)
    row = sqlite3.connect(tmp_path / "b.db").execute("SELECT gold FROM usersNew").fetchone()
    assert row == (1_500_000_000,)


def _writer(path: str, worker: int, barrier: multiprocessing.synchronize.Barrier) -> int:
    store = SqliteStore(path, POOLS)
    barrier.wait()
    charged = 0
    for i in range(500):
        request_id = f"w{worker}-{i}"
        hold = store.hold(request_id, "alice", OPENHANDS, D(1), D(1))
        cost = D(1) if isinstance(hold, Hold) else D(0)
        charged += int(cost)
        log = {"userId": "alice", "creditsCost": cost, "creditType": "openhands"}
        store.settle([Settlement(request_id, "alice", "openhands", cost, 1, 1, 0, None, log)])
    store.close()
    return charged


@pytest.mark.slow
def test_two_writer_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    store = open_store(Path(path))
    store.create_user("alice", "k", {"creditsNew": D(600)})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        results = pool.starmap(_writer, [(path, 0, barrier), (path, 1, barrier)])
    assert sum(results) == 600
    user = store.user("alice")
    assert user is not None
    assert (user["creditsNew"], user["creditsNewUsed"]) == (0, D(600))
    assert len(store.logs(2000)) == 1000
    assert store.open_holds(user["createdAt"].replace(year=3000)) == []
    store.close()


def _reader(path: str, stop: multiprocessing.synchronize.Event) -> int:
    store = SqliteStore(path, POOLS)
    seen = [0]
    while not stop.is_set() or len(seen) == 1:
        seen.append(len(store.logs(10_000)))
        assert seen[-1] >= seen[-2]  # the writer's commits show up, none goes missing
    store.close()
    return len(seen) - 1


@pytest.mark.slow
def test_reader_while_writer_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "b.db")
    store = open_store(Path(path))
    store.create_user("alice", "k", {"creditsNew": D(10_000)})
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(1) as pool:
        stop = manager.Event()
        reads = pool.apply_async(_reader, (path, stop))
        for i in range(300):
            s = Settlement(
                f"r{i}", "alice", "openhands", D(1), 1, 1, 0, None, {"creditsCost": D(1)}
            )
            store.settle([s])
        stop.set()
        assert reads.get(timeout=60) >= 1
    assert store.balance("alice", OPENHANDS) == D(9700)
    store.close()


def test_read_only_store_reads_and_refuses_every_write(tmp_path: Path) -> None:
    path = tmp_path / "shared?#name.db"  # URI characters in the file name
    writer = open_store(path)
    writer.import_user({"_id": "u", "creditsNew": 1.5})
    reader = SqliteStore(path, POOLS, read_only=True)
    assert reader.balance("u", OPENHANDS) == D("1.5")
    writer.topup("u", "creditsNew", D("1"))  # the writer goes on meanwhile
    assert reader.balance("u", OPENHANDS) == D("2.5")
    with pytest.raises((sqlite3.OperationalError, StoreError), match="readonly"):
        reader.topup("u", "creditsNew", D("1"))
    with pytest.raises((sqlite3.OperationalError, StoreError), match="readonly"):
        reader.import_log({"_id": "L", "creditsCost": 1})
    writer.close()
    reader.close()


def test_read_only_store_never_creates_a_file(tmp_path: Path) -> None:
    reader = SqliteStore(tmp_path / "missing.db", POOLS, read_only=True)
    with pytest.raises(StoreError):
        reader.logs(1)
    assert not (tmp_path / "missing.db").exists()


ORIGINAL_LOG_COLUMNS = (  # request_logs as burnmeter created it before the billed details
    "userId TEXT, userKeyId TEXT, model TEXT, inputTokens INTEGER, outputTokens INTEGER,"
    " cacheWriteTokens INTEGER, cacheHitTokens INTEGER, reasoningTokens INTEGER,"
    " creditsCost INTEGER, creditType TEXT, tokensUsed INTEGER, statusCode INTEGER,"
    " latencyMs INTEGER, ttftMs INTEGER, isSuccess INTEGER, createdAt INTEGER, host TEXT,"
    " upstream TEXT, path TEXT, stream INTEGER, usageSource TEXT"
)


def test_a_store_from_before_the_billed_details_reads_then_gains_their_columns(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        f"CREATE TABLE request_logs(_id TEXT PRIMARY KEY, {ORIGINAL_LOG_COLUMNS}, extra TEXT)"
    )
    db.execute(
        "INSERT INTO request_logs(_id, model, inputTokens, creditsCost, createdAt)"
        " VALUES ('old', 'm', 12, 5000, 1700000000000)"
    )
    db.commit()
    db.close()
    # a reader that changes nothing reads the old file as it is
    reader = SqliteStore(path, POOLS)
    [log] = reader.logs(5)
    assert (log["_id"], log["inputTokens"], log["creditsCost"]) == ("old", 12, D("0.000005"))
    assert "webSearchRequests" not in log
    reader.close()
    # the proxy's start-up adds the columns; the old row reads the same
    store = open_store(path)
    columns = {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(request_logs)")}
    assert {"webSearchRequests", "serviceTier", "cacheWrite1hTokens", "routeMultiplier"} <= columns
    assert store.logs(5) == [log]
    store.import_log({"_id": "new", "webSearchRequests": 2, "serviceTier": "flex"})
    row = sqlite3.connect(path).execute(
        "SELECT webSearchRequests, serviceTier, extra FROM request_logs WHERE _id = 'new'"
    )
    assert row.fetchone() == (2, "flex", None)  # in their columns, not kept aside


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_file_deleted_or_replaced_is_an_outage_until_the_same_file_is_back(
    tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    from burnmeter.documents import request_log
    from burnmeter.documents import utcnow
    from burnmeter.exceptions import StoreError
    from burnmeter.store.base import HoldRequest

    path = tmp_path / "b.db"
    store = open_store(path)
    store.create_user("alice", "sha256:k", {"creditsNew": D(5)})
    moved = tmp_path / "moved-away"
    moved.mkdir()
    for part in tmp_path.glob("b.db*"):  # the database and its WAL
        part.rename(moved / part.name)
    if how == "replaced":  # e.g. a CLI run against the path made a fresh, empty store
        open_store(path).close()

    def settlement(i: int) -> Settlement:
        log = request_log(
            request_id=f"r{i}", user_id="alice", key_mask="k", model="m", usage=None,
            cost=D(1), billing_tokens=0, pool="openhands", status_code=200, latency_ms=1,
            ttft_ms=None, host="h", upstream="u", path="/p", stream=False, created_at=utcnow(),
        )  # fmt: skip
        return Settlement(f"r{i}", "alice", "openhands", D(1), 0, 0, 0, None, log)

    with caplog.at_level("ERROR"):
        with pytest.raises(StoreError, match="deleted or replaced"):
            store.settle([settlement(1)])
        [outcome] = store.hold_many([HoldRequest("h1", "alice", OPENHANDS, D(1), D(1))])
        assert isinstance(outcome, StoreError)
        fresh = SqliteStore(path, POOLS)  # another thread's connection, say
        fresh._identity = store._identity
        with pytest.raises(StoreError):
            fresh.connection()
    assert len(caplog.records) == 1, "one ERROR line"
    if how == "replaced":
        assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM request_logs").fetchone() == (0,)
    else:
        assert not path.exists(), "no empty file created"
    for part in moved.glob("b.db*"):  # the operator puts it back
        part.replace(tmp_path / part.name)
    assert store.settle([settlement(1)]) == [True]
    assert store.balance("alice", OPENHANDS) == 4
    store.close()


# -- try_hold: a hold that never waits ------------------------------------------------


def wanted(request_id: str, amount: int) -> HoldRequest:
    return HoldRequest(request_id, "alice", OPENHANDS, D(amount), D(amount))


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
"""


def test_try_hold_gives_way_at_once_to_another_process_holding_the_write_lock(
    tmp_path: Path,
) -> None:
    store = open_store(tmp_path / "b.db")
    store.create_user("alice", "k", {"creditsNew": D(10)})
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, store.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline() == "locked\n"
        start = time.perf_counter()
        assert store.try_hold(wanted("r1", 3)) is None
        # the lock outlives the call: waiting for it would take busy_timeout (10 s)
        assert time.perf_counter() - start < 1.0
    finally:
        locker.communicate("\n", timeout=10)
    assert store.balance("alice", OPENHANDS) == 10  # None changed nothing
    hold = store.try_hold(wanted("r1", 3))  # its connection was left out of a transaction
    assert isinstance(hold, Hold) and store.balance("alice", OPENHANDS) == 7
    store.close()


def test_try_hold_never_checkpoints_and_the_writers_commits_still_do(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    store = open_store(path)
    store.create_user("alice", "k", {"creditsNew": D(10_000)})
    store.connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = store.connection().execute("PRAGMA page_size").fetchone()[0]

    def holds_in_the_database_file() -> int:
        """What the file holds without its WAL: what checkpoints have written back."""
        copy = tmp_path / "copy.db"
        shutil.copyfile(path, copy)
        conn = sqlite3.connect(copy)
        count: int = conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0]
        conn.close()
        copy.unlink()
        return count

    for i in range(400):
        assert isinstance(store.try_hold(wanted(f"r{i}", 1)), Hold)
    frames = (os.path.getsize(f"{path}-wal") - 32) // (24 + page_size)
    assert frames > 1000  # past SQLite's autocheckpoint threshold: try_hold's commits never ran one
    assert holds_in_the_database_file() == 0
    store.release(Hold("r0", "alice", "openhands", {"creditsNew": D(1)}, utcnow()))
    assert holds_in_the_database_file() == 399  # the other connection's commit checkpointed
    store.close()


def test_try_hold_holds_on_a_store_nothing_else_writes(tmp_path: Path) -> None:
    store = open_store(tmp_path / "b.db")
    store.create_user("alice", "k", {"creditsNew": D(10)})
    hold = store.try_hold(wanted("r1", 3))
    assert isinstance(hold, Hold) and store.balance("alice", OPENHANDS) == 7
    store.close()


def test_a_durable_or_read_only_store_never_tries(tmp_path: Path) -> None:
    open_store(tmp_path / "b.db").create_user("alice", "k", {"creditsNew": D(10)})
    for store in (
        SqliteStore(tmp_path / "b.db", POOLS, durable=True),
        SqliteStore(tmp_path / "b.db", POOLS, read_only=True),
    ):
        assert store.try_hold(wanted("r1", 3)) is None
        store.close()
