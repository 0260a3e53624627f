from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import tempfile
import threading
import uuid
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from datetime import timezone
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from burnmeter.config import default_config
from burnmeter.documents import request_log
from burnmeter.exceptions import JournalError
from burnmeter.exceptions import JournalFull
from burnmeter.exceptions import JournalLocked
from burnmeter.journal import FORMAT_VERSION
from burnmeter.journal import Journal
from burnmeter.journal import from_json
from burnmeter.journal import to_json
from burnmeter.records import UsageRecord
from burnmeter.store import open_store
from burnmeter.store.base import Settlement
from burnmeter.text import MAX_TEXT
from burnmeter.writer import SettlementWriter


def settlement(i: int, cost: str = "0.000123456") -> Settlement:
    return Settlement(
        request_id=f"req-{i}",
        user_id="alice",
        pool="openhands",
        cost=Decimal(cost),
        billing_tokens=10 + i,
        input_tokens=7,
        output_tokens=3 + i,
        key_doc_id=None,
        log={
            "_id": f"req-{i}",
            "userKeyId": "sk-burn…ab12",
            "creditsCost": Decimal(cost),
            "createdAt": datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
            "ttftMs": None,
            "stream": True,
            "model": "claude-sonnet-4-5 ✓",
        },
    )


def ids(records: list[tuple[int, Settlement]]) -> list[str]:
    return [s.request_id for _, s in records]


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "settlements.journal")


def test_round_trip_is_exact() -> None:
    local = timezone(timedelta(hours=7))
    s = Settlement(
        request_id="r1",
        user_id="bob",
        pool="ohmygpt",
        cost=Decimal("0.1000000001"),
        billing_tokens=0,
        input_tokens=0,
        output_tokens=0,
        key_doc_id="sha256:abc",
        log={
            "creditsCost": Decimal("1E-9"),
            "createdAt": datetime(2025, 6, 1, 23, 59, 59, 999999, tzinfo=local),
            "nested": {"at": datetime(2025, 6, 1, tzinfo=UTC), "xs": [Decimal("2.50")]},
            "ttftMs": None,
        },
    )
    line = to_json(s)
    assert "\n" not in line
    back = from_json(line)
    assert back == s
    assert str(back.cost) == "0.1000000001"
    assert str(back.log["nested"]["xs"][0]) == "2.50"
    assert back.log["createdAt"].utcoffset() == timedelta(hours=7)
    assert from_json(to_json(settlement(1))) == settlement(1)


def test_what_orjson_refuses_is_journaled_by_the_stdlib(path: str) -> None:
    """A lone surrogate (replaced), an integer past 64 bits, a key that is no string."""
    s = settlement(0)
    log = s.log | {"model": "gpt\ud800", "big": 2**70, "byStatus": {200: Decimal("1.5")}}
    odd = dataclasses.replace(s, log=log)
    back = from_json(to_json(odd))
    assert back.log["model"] == "gpt\ufffd"
    assert back.log["big"] == 2**70
    assert back.log["byStatus"] == {"200": Decimal("1.5")}
    with Journal(path) as j:
        j.append(odd)
    with Journal(path) as j:
        assert j.pending(1)[0][1].log == back.log


def test_pending_advance_and_compaction(path: str) -> None:
    with Journal(path) as j:
        for i in range(3):
            j.append(settlement(i))
        assert j.backlog == 3
        first = j.pending(2)
        assert ids(first) == ["req-0", "req-1"]
        assert j.pending(2) == first  # nothing moves until advance
        j.advance(first[-1][0])
        assert j.backlog == 1
        assert Path(path + ".checkpoint").read_text() == str(first[-1][0])
        rest = j.pending(10)
        assert ids(rest) == ["req-2"]
        assert rest[0][0] == os.path.getsize(path)
        j.advance(rest[0][0])
        assert os.path.getsize(path) == 0  # caught up: the file is emptied
        assert Path(path + ".checkpoint").read_text() == "0"
        assert j.backlog == 0 and j.pending(10) == []
        j.append(settlement(3))
        assert ids(j.pending(10)) == ["req-3"]


def test_checkpoint_survives_reopen(path: str) -> None:
    with Journal(path) as j:
        for i in range(3):
            j.append(settlement(i))
        j.advance(j.pending(1)[0][0])
    with Journal(path) as j:
        assert j.backlog == 2
        assert ids(j.pending(10)) == ["req-1", "req-2"]


def test_unpersisted_checkpoint_replays_then_close_persists_it(path: str) -> None:
    with Journal(path) as j:
        for i in range(3):
            j.append(settlement(i))
        j.advance(j.pending(1)[0][0])
        behind = Path(path + ".checkpoint").read_text()
        applied = j.pending(1)[0][0]
        j.advance(applied, persist=False)
        assert j.backlog == 1 and ids(j.pending(10)) == ["req-2"]
        # a crash now would replay req-1 (applied, charged once): the file lags behind
        assert Path(path + ".checkpoint").read_text() == behind
    assert Path(path + ".checkpoint").read_text() == str(applied)
    with Journal(path) as j:
        assert ids(j.pending(10)) == ["req-2"]


def test_caught_up_journal_with_checkpoint_zero_is_not_rewritten(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Journal(path) as j:
        j.append(settlement(0))
        j.advance(j.pending(1)[0][0])
        assert Path(path + ".checkpoint").read_text() == "0"
        renames: list[str] = []
        replace = os.replace

        def counted(src: str, dst: str) -> None:
            renames.append(dst)
            replace(src, dst)

        monkeypatch.setattr(os, "replace", counted)
        j.append(settlement(1))
        j.advance(j.pending(1)[0][0])
        assert os.path.getsize(path) == 0
        assert renames == []  # the checkpoint file already read 0
        assert Path(path + ".checkpoint").read_text() == "0"


def test_torn_tail_is_cut_off(path: str) -> None:
    with Journal(path) as j:
        j.append(settlement(0))
        j.append(settlement(1))
    whole = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(to_json(settlement(2)).encode()[:40])  # died inside the write
    with Journal(path) as j:
        assert os.path.getsize(path) == whole
        assert j.backlog == 2
        j.append(settlement(3))
        assert ids(j.pending(10)) == ["req-0", "req-1", "req-3"]


def test_undecodable_record_is_set_aside(path: str) -> None:
    with Journal(path) as j:
        j.append(settlement(0))
    with open(path, "ab") as f:
        f.write(b"\x00\x00garbage\n")
    with Journal(path) as j:
        j.append(settlement(1))
        assert ids(j.pending(10)) == ["req-0"]  # what precedes the bad line comes first
        j.advance(j.pending(10)[-1][0])
        assert ids(j.pending(10)) == ["req-1"]
        assert j.backlog == 1
    assert Path(path + ".rejected").read_bytes() == b"\x00\x00garbage\n"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cost", '"12,5"'),  # decimal.InvalidOperation
        ("log", "[" * 5000 + "]" * 5000),  # RecursionError
    ],
)
def test_a_damaged_record_is_set_aside_too(path: str, field: str, value: str) -> None:
    record = json.loads(to_json(settlement(0)))
    record[field] = "@"
    damaged = json.dumps(record).replace('"@"', value)
    with open(path, "w") as f:
        f.write(damaged + "\n" + to_json(settlement(1)) + "\n")
    with Journal(path) as j:
        assert ids(j.pending(10)) == ["req-1"]
    assert Path(path + ".rejected").read_text() == damaged + "\n"


@pytest.mark.parametrize("content", ["garbage", "5"])  # unreadable; not at a line start
def test_doubtful_checkpoint_replays_everything(path: str, content: str) -> None:
    with Journal(path) as j:
        j.append(settlement(0))
        j.append(settlement(1))
    Path(path + ".checkpoint").write_text(content)
    with Journal(path) as j:
        assert ids(j.pending(10)) == ["req-0", "req-1"]


def test_full_journal_refuses_until_drained(path: str) -> None:
    line = len(to_json(settlement(0)).encode()) + 1
    with Journal(path, max_bytes=2 * line) as j:
        j.append(settlement(0))
        j.append(settlement(1))
        with pytest.raises(JournalFull, match="full"):
            j.append(settlement(2))
        assert j.backlog == 2
        j.advance(j.pending(10)[-1][0])
        j.append(settlement(2))
        assert ids(j.pending(10)) == ["req-2"]


def test_one_journal_per_path_in_process(path: str) -> None:
    with Journal(path):
        with pytest.raises(JournalLocked, match="settlements.journal"):
            Journal(path)
    Journal(path).close()  # closing released the lock


def _hold_journal(path: str, ready: Connection, release: Connection) -> None:
    with Journal(path):
        ready.send(True)
        release.recv()


def test_second_process_gets_journal_locked(path: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    release_r, release_w = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_hold_journal, args=(path, ready_w, release_r))
    child.start()
    try:
        assert ready_r.poll(20), "child did not open the journal"
        with pytest.raises(JournalLocked) as e:
            Journal(path)
        assert path in str(e.value)
    finally:
        release_w.send(True)
        child.join(10)
    assert child.exitcode == 0
    Journal(path).close()


def test_concurrent_appends_while_draining(path: str) -> None:
    """Appends from several threads while a consumer drains: each record once, in order."""
    per_thread, threads = 300, 4
    seen: list[str] = []
    done = threading.Event()
    with Journal(path) as j:

        def produce(t: int) -> None:
            for i in range(per_thread):
                j.append(settlement(t * per_thread + i))

        def consume() -> None:
            while not (done.is_set() and j.backlog == 0):
                batch = j.pending(50)
                if batch:
                    seen.extend(ids(batch))
                    j.advance(batch[-1][0])

        consumer = threading.Thread(target=consume)
        consumer.start()
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for p in producers:
            p.start()
        for p in producers:
            p.join()
        done.set()
        consumer.join(10)
    assert sorted(seen) == sorted(f"req-{i}" for i in range(per_thread * threads))
    for t in range(threads):  # each producer's records stay in its order
        mine = [s for s in seen if int(s[4:]) // per_thread == t]
        assert mine == [f"req-{t * per_thread + i}" for i in range(per_thread)]
    assert os.path.getsize(path) == 0


def test_records_appended_here_are_served_from_memory_then_from_the_file(path: str) -> None:
    with Journal(path) as journal:
        for i in range(3):
            journal.append(settlement(i))
        in_memory = journal.pending(2)
        assert [s for _, s in in_memory] == [settlement(0), settlement(1)]
        with open(path, "ab") as f:  # what is in memory is not read back from the file
            f.write(b"not json\n")
        assert ids(journal.pending(10)) == ["req-0", "req-1", "req-2"]
        journal.advance(in_memory[-1][0])
    with Journal(path) as reopened:  # another process: the same records, from the file
        assert ids(reopened.pending(1)) == ["req-2"]


def test_a_long_backlog_is_read_back_from_the_file(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("burnmeter.journal.MEMORY_RECORDS", 2)
    with Journal(path) as journal:
        for i in range(4):
            journal.append(settlement(i))
        assert ids(journal.pending(10)) == ["req-0", "req-1"]
        journal.advance(journal.pending(10)[-1][0])
        assert ids(journal.pending(10)) == ["req-2", "req-3"]  # decoded from the file
        journal.append(settlement(4))
        assert ids(journal.pending(10)) == ["req-2", "req-3", "req-4"]


# any code point, lone surrogates included, and strings far longer than a log field keeps
HOSTILE_TEXT = st.text(
    st.one_of(st.characters(codec=None, exclude_categories=()), st.characters(categories=["Cs"])),
    max_size=3000,
)


@settings(max_examples=60, deadline=None)
@given(host=HOSTILE_TEXT, path=HOSTILE_TEXT, model=HOSTILE_TEXT, upstream=HOSTILE_TEXT)
def test_any_client_strings_are_journaled_and_applied(
    host: str, path: str, model: str, upstream: str
) -> None:
    """The request log of any request can be journaled, read back and applied."""
    request_id = f"req-{uuid.uuid4().hex}"
    log = request_log(
        request_id=request_id,
        user_id="alice",
        key_mask="sk-burn…ab12",
        model=model,
        usage=UsageRecord(input_tokens=10, output_tokens=5),
        cost=Decimal("0.25"),
        billing_tokens=15,
        pool="openhands",
        status_code=200,
        latency_ms=1,
        ttft_ms=None,
        host=host,
        upstream=upstream,
        path=path,
        stream=False,
        created_at=datetime.now(UTC),
    )
    assert all(len(log[name]) <= MAX_TEXT for name in ("host", "path", "model", "upstream"))
    s = Settlement(request_id, "alice", "openhands", Decimal("0.25"), 15, 10, 5, None, log)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(f"sqlite:///{tmp}/b.db", default_config().pools)
        store.ensure_schema(0)
        store.create_user("alice", "sha256:k", {"creditsNew": Decimal(1)})
        with Journal(f"{tmp}/j") as journal:
            journal.append(s)
            [(_, back)] = journal.pending(10)
        assert store.settle([back]) == [True]
        assert store.balance("alice", default_config().pools["openhands"]) == Decimal("0.75")
        stored = store.log(request_id)
        store.close()
    assert stored is not None and stored["host"] == back.log["host"]


def _fill_then_free(path: str, conn: Connection) -> None:
    """In a child process: a file size limit makes the kernel refuse the journal's writes
    (EFBIG, as ENOSPC would), then the limit is lifted."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    outcome: dict[str, object] = {}
    with Journal(path) as journal:
        appended = 0
        try:
            for i in range(100):
                journal.append(settlement(i))
                appended += 1
        except JournalError as e:
            outcome["error"] = str(e)
        outcome["appended"] = appended
        outcome["failing"] = journal.failing
        outcome["probe_while_full"] = journal.probe()
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        outcome["probe_after"] = journal.probe()
        outcome["failing_after"] = journal.failing
        journal.append(settlement(1000))
        outcome["pending"] = ids(journal.pending(1000))
    conn.send(outcome)


def test_a_write_the_kernel_refuses_marks_the_journal_failing_until_a_probe_succeeds(
    path: str,
) -> None:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("fork").Process(
        target=_fill_then_free, args=(path, child)
    )
    process.start()
    outcome = parent.recv()
    process.join(10)
    assert process.exitcode == 0
    appended = outcome["appended"]
    # the kernel writes up to the limit (a short write), then refuses (EFBIG)
    assert 0 < appended < 100
    assert "short write" in outcome["error"] or "File too large" in outcome["error"]
    assert outcome["failing"] and outcome["probe_while_full"] is False
    assert outcome["probe_after"] is True and outcome["failing_after"] is None
    assert outcome["pending"] == [f"req-{i}" for i in range(appended)] + ["req-1000"]
    with open(path, "rb") as f:  # no half record, no probe blanks
        assert all(line.startswith(b'{"request_id"') for line in f)


def test_a_failed_fsync_marks_the_journal_failing_and_fails_the_records_it_covered(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with Journal(path, fsync=True) as journal:
        monkeypatch.setattr(os, "fsync", eio)
        synced = journal.append(settlement(1))
        with pytest.raises(JournalError, match="cannot fsync"):
            synced.result(timeout=10)
        assert journal.failing is not None
        assert not journal.probe(), "a probe fsyncs too"
        monkeypatch.undo()
        assert journal.probe() and journal.failing is None
        assert ids(journal.pending(10)) == ["req-1"]  # written: the writer applies it


def test_without_fsync_an_append_is_done_at_once(path: str) -> None:
    with Journal(path) as journal:
        assert journal.append(settlement(1)).done()
        assert journal.fsyncs == 0


def test_group_commit_one_fsync_covers_every_record_appended_while_one_ran(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nine appends while the first record's fsync runs share the next fsync: two in all."""
    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def gated(fd: int) -> None:
        entered.set()
        assert release.wait(10)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", gated)
    with Journal(path, fsync=True) as journal:
        first = journal.append(settlement(0))
        assert entered.wait(10)  # the syncer is inside the first fsync
        rest = [journal.append(settlement(i)) for i in range(1, 10)]
        assert not first.done() and not any(f.done() for f in rest)
        release.set()
        for synced in [first, *rest]:
            synced.result(timeout=10)
        assert journal.fsyncs == 2


def test_close_syncs_what_is_waiting(path: str) -> None:
    journal = Journal(path, fsync=True)
    synced = [journal.append(settlement(i)) for i in range(5)]
    journal.close()
    assert all(f.done() and f.exception() is None for f in synced)


# -- format versions -----------------------------------------------------------------------
V1_JOURNAL = Path(__file__).parent / "data" / "journal-v1.jsonl"
"""Two records as the first format wrote them (no ``v``), by that version's code."""


def test_records_carry_the_format_version() -> None:
    line = to_json(settlement(1))
    assert line.startswith('{"request_id"') and json.loads(line)["v"] == FORMAT_VERSION == 2


def test_a_journal_of_the_previous_format_is_replayed(tmp_path: Path) -> None:
    path = tmp_path / "old.journal"
    path.write_bytes(V1_JOURNAL.read_bytes())
    assert b'"v"' not in path.read_bytes()
    store = open_store(store_url(tmp_path), default_config().pools)
    store.ensure_schema(0)
    store.create_user("alice", "sha256:x", {"creditsNew": Decimal(1), "credits": Decimal(1)})
    with Journal(str(path)) as journal:
        writer = SettlementWriter(
            lambda: open_store(store_url(tmp_path), default_config().pools), journal
        )
        writer.start()
        assert writer.stop(10) == 0
        assert journal.set_aside_count == 0
    log = store.log("v1-req-1")
    assert log is not None and log["creditsCost"] == Decimal("0.0045")
    assert log["createdAt"] == datetime(2026, 11, 30, 9, 15, 0, 123000, tzinfo=UTC)
    assert store.balance("alice", store.pools["openhands"]) == Decimal("0.9955")
    assert store.balance("alice", store.pools["ohmygpt"]) == Decimal("0.999876544")
    store.close()


def test_a_record_of_a_newer_format_is_set_aside_not_guessed_at(path: str) -> None:
    newer = json.loads(to_json(settlement(1))) | {"v": FORMAT_VERSION + 1}
    with open(path, "w") as f:
        f.write(json.dumps(newer) + "\n" + to_json(settlement(2)) + "\n")
    with Journal(path) as journal:
        assert ids(journal.pending(10)) == ["req-2"]
        assert journal.set_aside_count == 1
    with open(path + ".rejected") as f:
        assert json.loads(f.read())["v"] == FORMAT_VERSION + 1


def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'b.db'}"
