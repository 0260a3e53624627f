"""``burnmeter journal replay``: spilled ERROR lines and ``.rejected`` records, once each."""

from __future__ import annotations

import json
import logging
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from addons.metering import spill
from burnmeter.documents import request_log
from burnmeter.journal import Journal
from burnmeter.records import UsageRecord
from burnmeter.store.base import Settlement
from tests.cli_backends import Backend
from tests.cli_backends import backend_fixture  # noqa: F401


def settlement(i: int, pool: str = "openhands") -> Settlement:
    cost = Decimal(i) / 100
    log = request_log(
        request_id=f"req-{i}",
        user_id="alice",
        key_mask="sk-burn…ab12",
        model="m",
        usage=UsageRecord(input_tokens=10, output_tokens=i),
        cost=cost,
        billing_tokens=10 + i,
        pool=pool,
        status_code=200,
        latency_ms=5,
        ttft_ms=None,
        host="chat.example\udcff",  # as a hostile Host header leaves it
        upstream="up.example",
        path="/v1/chat/completions",
        stream=False,
        created_at=datetime.now(UTC),
    )
    return Settlement(f"req-{i}", "alice", pool, cost, 10 + i, 10, i, None, log)


def spilled_log(tmp_path: Path, caplog: pytest.LogCaptureFixture, *settlements: Settlement) -> Path:
    """A proxy log as mitmdump writes it: timestamps, other lines, the ERROR lines."""
    with caplog.at_level(logging.ERROR):
        for s in settlements:
            spill(s, "journal.log: cannot append: [Errno 28] No space left on device")
    lines = ["[12:00:00.000] metering: store sqlite:///x.db, journal x.journal"]
    lines += [f"[12:00:01.{i:03d}] {message}" for i, message in enumerate(caplog.messages)]
    path = tmp_path / "mitmdump.log"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def replay(backend: Backend, path: Path) -> tuple[int, list[dict[str, object]]]:
    result = backend.run("journal", "replay", str(path), "--format", "json")
    return result.exit_code, json.loads(result.stdout)


def test_spilled_lines_are_applied_once(
    backend: Backend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert backend.run("accounts", "create", "alice", "--pool", "openhands=5").exit_code == 0
    path = spilled_log(tmp_path, caplog, settlement(1), settlement(2))
    code, rows = replay(backend, path)
    assert code == 0
    assert [(r["request_id"], r["outcome"]) for r in rows] == [
        ("req-1", "applied"),
        ("req-2", "applied"),
    ]
    assert [r["line"] for r in rows] == [2, 3]
    assert backend.user("alice")["creditsNew"] == Decimal("4.97")
    code, rows = replay(backend, path)  # again: nothing charged twice
    assert code == 0 and {r["outcome"] for r in rows} == {"already"}
    assert backend.user("alice")["creditsNew"] == Decimal("4.97")
    log = backend.store().log("req-2")
    assert log is not None and log["host"] == "chat.example\ufffd"


def test_rejected_records_are_applied_and_a_bad_one_fails_alone(
    backend: Backend, tmp_path: Path
) -> None:
    assert backend.run("accounts", "create", "alice", "--pool", "openhands=5").exit_code == 0
    journal_path = str(tmp_path / "settlements.journal")
    with Journal(journal_path) as journal:
        for s in (settlement(3), settlement(4, pool="gone"), settlement(5)):
            journal.append(s)
        for end, s in journal.pending(10):
            journal.set_aside(end, s, KeyError(s.pool))  # what the writer does
    rejected = Path(journal_path + ".rejected")
    with rejected.open("a") as f:
        f.write('{"request_id": "torn\n')
    code, rows = replay(backend, rejected)
    assert code == 1
    outcomes = [(r["request_id"], r["outcome"]) for r in rows]
    assert outcomes == [
        ("req-3", "applied"),
        ("req-4", "failed"),
        ("req-5", "applied"),
        (None, "failed"),
    ]
    assert "gone" in str(rows[1]["reason"]) and "not a settlement record" in str(rows[3]["reason"])
    assert backend.user("alice")["creditsNew"] == Decimal("4.92")
    table = backend.run("journal", "replay", str(rejected))
    assert table.exit_code == 1 and "already" in table.stdout and "req-4" in table.stdout


def test_a_file_without_records_applies_nothing(backend: Backend, tmp_path: Path) -> None:
    path = tmp_path / "empty.log"
    path.write_text("nothing to see\n")
    backend.store().ensure_schema(0)  # replay applies to a store that exists
    result = backend.run("journal", "replay", str(path))
    assert result.exit_code == 0 and "(no rows)" in result.stdout
