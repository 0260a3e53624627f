"""The CLI as a new user meets it: which config and store it uses, that reading changes
nothing, ``purge``, and the output details (exact CSV, quiet broken pipe, plots)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from click.testing import Result

from burnmeter.config import default_config
from burnmeter.documents import utcnow
from burnmeter.store.sqlite import SqliteStore
from stats.cli import cli

POOLS = default_config().pools
BURNMETER = Path(sys.executable).with_name("burnmeter")


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


@pytest.fixture(autouse=True)
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs in an empty directory, without the store and config variables."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    monkeypatch.delenv("BURNMETER_CONFIG", raising=False)
    return tmp_path


def store_with_logs(path: Path, ages_days: list[int]) -> None:
    store = SqliteStore(path, POOLS)
    store.ensure_schema(0)
    store.create_user("alice", "sha256:alice", {"credits": Decimal(1)})
    for i, age in enumerate(ages_days):
        store.import_log(
            {
                "_id": f"L{i}",
                "userId": "alice",
                "creditType": "ohmygpt",
                "creditsCost": Decimal("0.000000001") * (i + 1),
                "createdAt": utcnow() - timedelta(days=age),
            }
        )
    store.close()


def log_ids(path: Path) -> set[str]:
    store = SqliteStore(path, POOLS)
    try:
        return {str(doc["_id"]) for doc in store.logs(1000)}
    finally:
        store.close()


# -- reading deletes nothing, needs no write access, and never creates a store ------------
REPORTS = [
    ["summary", "--period", "all"],
    ["users", "--period", "30d"],
    ["models"],
    ["series", "--period", "7d"],
    ["logs"],
    ["reconcile"],
    ["accounts", "list"],
    ["accounts", "show", "alice"],
]


@pytest.mark.parametrize("report", REPORTS, ids=lambda r: " ".join(r[:2]))
def test_a_report_without_config_leaves_old_logs_in_place(
    elsewhere: Path, report: list[str]
) -> None:
    db = elsewhere / "history.db"
    store_with_logs(db, [400, 100, 31, 1])  # older than the built-in 30 days, but three
    before = db.read_bytes()
    result = run("--db", f"sqlite:///{db}", *report)
    assert result.exit_code == 0, result.stderr
    assert log_ids(db) == {"L0", "L1", "L2", "L3"}
    assert db.read_bytes() == before


@pytest.mark.parametrize("report", REPORTS, ids=lambda r: " ".join(r[:2]))
def test_a_report_reads_a_read_only_file(elsewhere: Path, report: list[str]) -> None:
    db = elsewhere / "ro.db"
    store_with_logs(db, [1])
    db.chmod(0o444)
    result = run("--db", f"sqlite:///{db}", *report)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    "command",
    [*REPORTS, ["accounts", "topup", "alice", "--pool", "ohmygpt", "--amount", "1"], ["purge"]],
    ids=lambda r: " ".join(r[:2]),
)
def test_a_missing_store_is_one_line_exit_1_and_nothing_created(
    elsewhere: Path, command: list[str]
) -> None:
    result = run(*command, input="y\n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1] == (
        "burnmeter: error: burnmeter.db: no such store"
        " (`burnmeter accounts create` or `import` makes one)"
    )
    assert list(elsewhere.iterdir()) == []


def test_a_file_that_is_no_store_is_one_line(elsewhere: Path) -> None:
    (elsewhere / "burnmeter.db").write_text("hello")
    result = run("summary")
    assert result.exit_code == 1
    assert (
        result.stderr.splitlines()[-1] == "burnmeter: error: burnmeter.db: file is not a database"
    )
    assert (elsewhere / "burnmeter.db").read_text() == "hello"


def test_create_and_import_create_the_store(elsewhere: Path) -> None:
    assert run("accounts", "create", "alice").exit_code == 0
    assert (elsewhere / "burnmeter.db").exists()
    logs = elsewhere / "logs.jsonl"
    logs.write_text('{"_id": "x", "createdAt": {"$date": "2099-01-01T00:00:00Z"}}\n')
    assert run("--db", "sqlite:///other.db", "import", "logs", str(logs)).exit_code == 0
    assert log_ids(elsewhere / "other.db") == {"x"}


# -- one config, found the same way everywhere ----------------------------------------------
def test_config_discovery_order_and_notice(
    elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_with_logs(elsewhere / "burnmeter.db", [])
    (elsewhere / "named.toml").write_text('timezone = "UTC"\n')
    (elsewhere / "env.toml").write_text('timezone = "Europe/Paris"\n')
    (elsewhere / "burnmeter.toml").write_text('timezone = "America/New_York"\n')

    def zone_and_notice(*options: str) -> tuple[str, str]:
        result = run(*options, "summary")
        assert result.exit_code == 0, result.stderr
        period = next(line for line in result.stdout.splitlines() if line.startswith("Period"))
        return period.rsplit("(", 1)[1].rstrip(")"), result.stderr

    monkeypatch.setenv("BURNMETER_CONFIG", "env.toml")
    assert zone_and_notice("--config", "named.toml") == ("UTC", "")
    assert zone_and_notice() == (
        "Europe/Paris",
        "burnmeter: config env.toml ($BURNMETER_CONFIG)\n",
    )
    monkeypatch.delenv("BURNMETER_CONFIG")
    assert zone_and_notice() == (
        "America/New_York",
        "burnmeter: config burnmeter.toml (working directory)\n",
    )
    (elsewhere / "burnmeter.toml").unlink()
    assert zone_and_notice() == (
        "Asia/Ho_Chi_Minh",
        "burnmeter: config built-in (no --config, $BURNMETER_CONFIG or ./burnmeter.toml)\n",
    )


def test_a_bad_config_is_one_line(elsewhere: Path) -> None:
    (elsewhere / "burnmeter.toml").write_text("log_ttl_days = -1\n")
    result = run("summary")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "burnmeter: error: burnmeter.toml: log_ttl_days: Input should be greater than or equal to 0"
    )


# -- purge ------------------------------------------------------------------------------------
def test_purge_says_what_it_deletes_asks_and_deletes_only_that(elsewhere: Path) -> None:
    db = elsewhere / "burnmeter.db"
    store_with_logs(db, [400, 31, 29, 1])
    (elsewhere / "burnmeter.toml").write_text("log_ttl_days = 30\n")
    declined = run("purge", input="n\n")
    assert declined.exit_code == 1
    assert declined.stdout.startswith("2 request log(s) created before ")
    assert "(older than 30 days; config burnmeter.toml (working directory)" in declined.stdout
    assert "store sqlite:///burnmeter.db)" in declined.stdout
    assert "Delete 2 request log(s)? [y/N]" in declined.stderr
    assert log_ids(db) == {"L0", "L1", "L2", "L3"}

    done = run("purge", "--yes", "--format", "json")
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["days"], report["to_delete"], report["deleted"]) == (30, 2, 2)
    assert log_ids(db) == {"L2", "L3"}
    assert run("purge", "--days", "2", "--yes").stdout.splitlines()[-1] == "deleted 1"
    assert log_ids(db) == {"L3"}


def test_purge_with_keep_forever_does_nothing(elsewhere: Path) -> None:
    db = elsewhere / "burnmeter.db"
    store_with_logs(db, [400])
    (elsewhere / "burnmeter.toml").write_text("log_ttl_days = 0\n")
    result = run("purge", "--yes")
    assert result.exit_code == 0
    assert "logs are kept forever, nothing to purge" in result.stdout
    assert log_ids(db) == {"L0"}


# -- output -----------------------------------------------------------------------------------
def test_money_is_exact_to_the_nano_usd_in_csv_and_tables(elsewhere: Path) -> None:
    db = elsewhere / "burnmeter.db"
    store_with_logs(db, [1, 1, 1])  # 0.000000001 + 0.000000002 + 0.000000003
    (row,) = csv.DictReader(io.StringIO(run("users", "--period", "7d", "--format", "csv").stdout))
    assert row["cost"] == "0.000000006"
    logs = list(csv.DictReader(io.StringIO(run("logs", "--format", "csv").stdout)))
    assert sorted(r["creditsCost"] for r in logs) == ["0.000000001", "0.000000002", "0.000000003"]
    table = run("logs").stdout.splitlines()
    assert sorted(line.split()[-1] for line in table[2:]) == [
        "0.000000001",
        "0.000000002",
        "0.000000003",
    ]
    summary_csv = run("summary", "--period", "7d", "--format", "csv").stdout
    (summary,) = csv.DictReader(io.StringIO(summary_csv))
    assert summary["total_burned"] == "0.000000006"


def test_output_cut_short_by_its_reader_ends_quietly(elsewhere: Path) -> None:
    """As ``burnmeter logs | head`` once head has gone: a pipe whose reader is closed."""
    store_with_logs(elsewhere / "burnmeter.db", [1] * 50)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [str(BURNMETER), "logs", "--limit", "50"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1  # click's status for a reader gone
    assert done.stderr.splitlines() == [
        "burnmeter: config built-in (no --config, $BURNMETER_CONFIG or ./burnmeter.toml)"
    ]


def test_summary_says_funded_users_for_all_and_active_users_otherwise(elsewhere: Path) -> None:
    store_with_logs(elsewhere / "burnmeter.db", [1])
    every = run("summary", "--period", "all").stdout
    assert "Users              1 (1 funded)" in every.splitlines()
    week = run("summary", "--period", "7d").stdout
    assert "Users              1 (1 active)" in week.splitlines()
    assert (
        json.loads(run("summary", "--period", "all", "--format", "json").stdout)["active_users"]
        == 1
    )


@pytest.mark.parametrize("period, bars", [("3d", 72), ("7d", 7), ("30d", 30)])
def test_plot_prints_its_path_and_stays_readable(elsewhere: Path, period: str, bars: int) -> None:
    pytest.importorskip("matplotlib")
    from stats.plot import MAX_HOUR_BARS

    store_with_logs(elsewhere / "burnmeter.db", [1, 2])
    png = elsewhere / "spend.png"
    result = run("series", "--period", period, "--plot", str(png), "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.endswith(f"burnmeter: plot written to {png}\n")
    rows = json.loads(result.stdout)
    assert len(rows) in (24 * int(period[:-1]), 24 * int(period[:-1]) + 1)  # hours as asked
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    assert 800 <= width <= 1600  # bounded: 8 to 16 inches at 100 dpi
    days = {str(r["start"])[:10] for r in rows}  # a longer window is drawn per local day
    drawn = len(rows) if len(rows) <= MAX_HOUR_BARS else len(days)
    assert abs(drawn - bars) <= 1


def test_plot_to_an_unwritable_place_is_one_line(elsewhere: Path) -> None:
    pytest.importorskip("matplotlib")
    store_with_logs(elsewhere / "burnmeter.db", [1])
    result = run("series", "--plot", str(elsewhere / "missing" / "x.png"))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("burnmeter: error: --plot ")


# -- accounts list, enable, rotate-key --------------------------------------------------------
def test_accounts_list_enable_and_rotate_key(elsewhere: Path) -> None:
    created = run("accounts", "create", "bob", "--pool", "openhands=2", "--format", "json")
    old_key = json.loads(created.stdout)["key"]
    assert run("accounts", "disable", "bob").exit_code == 0
    (row,) = json.loads(run("accounts", "list", "--format", "json").stdout)
    assert (row["user"], row["active"], row["openhands"], row["ohmygpt"]) == ("bob", False, 2, 0)
    enabled = run("accounts", "enable", "bob")
    assert enabled.stdout == "bob: enabled; the proxy accepts its keys within 30 s\n"
    assert json.loads(run("accounts", "list", "--format", "json").stdout)[0]["active"] is True

    rotated = run("accounts", "rotate-key", "bob")
    assert rotated.exit_code == 0, rotated.stderr
    (new_key,) = [w for w in rotated.stdout.split() if w.startswith("sk-")]
    assert new_key != old_key and rotated.stdout.count(new_key) == 1
    assert rotated.stderr.endswith("bob: 1 old key(s) stop working within 30 s\n")
    store = SqliteStore(elsewhere / "burnmeter.db", POOLS)
    try:
        old = store.find_key(old_key)
        assert old is not None and old.key_active is False
        new = store.find_key(new_key)
        assert new is not None and new.key_active and new.user_id == "bob"
    finally:
        store.close()
    missing = run("accounts", "rotate-key", "nobody")
    assert missing.exit_code == 1
    assert missing.stderr.splitlines()[-1] == "burnmeter: error: no user 'nobody'"


# -- MongoDB unreachable ----------------------------------------------------------------------
def test_mongodb_unreachable_is_one_short_line() -> None:
    result = run("--db", "mongodb://127.0.0.1:9/fproxy?serverSelectionTimeoutMS=300", "summary")
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()[-1:]
    assert line == (
        "burnmeter: error: MongoDB unreachable after 0.3 s: 127.0.0.1:9: [Errno 111] Connection refused"
    )
    assert "Topology" not in line and len(line) < 200, line


@pytest.mark.parametrize(
    "url, seconds",
    [
        ("mongodb://127.0.0.1:9/fproxy", 3.0),
        ("mongodb://127.0.0.1:9/fproxy?serverSelectionTimeoutMS=300", 0.3),
        ("mongodb://127.0.0.1:9/fproxy?serverselectiontimeoutms=1500", 1.5),
    ],
)
def test_mongodb_wait_is_the_urls_or_three_seconds(url: str, seconds: float) -> None:
    from burnmeter.store.mongo import MongoStore

    store = MongoStore.from_url(url, POOLS)
    try:
        assert store.db.client.options.server_selection_timeout == seconds
    finally:
        store.close()


def test_mongodb_reports_need_the_store_and_create_no_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mongomock

    from burnmeter.store.mongo import MongoStore

    database = mongomock.MongoClient(tz_aware=True)["fproxy"]
    monkeypatch.setattr(
        MongoStore, "from_url", classmethod(lambda cls, url, pools: cls(database, pools))
    )
    url = ["--db", "mongodb://127.0.0.1:9/fproxy"]
    missing = run(*url, "summary")
    assert missing.exit_code == 1
    assert missing.stderr.splitlines()[-1] == (
        "burnmeter: error: MongoDB database 'fproxy': no usersNew collection"
    )
    assert database.list_collection_names() == []

    database["usersNew"].insert_one({"_id": "alice", "credits": 1.5, "isActive": True})
    for report in REPORTS:
        result = run(*url, *report)
        assert result.exit_code == 0, (report, result.stderr)
    assert sorted(database.list_collection_names()) == ["usersNew"]
    assert list(database["usersNew"].index_information()) == ["_id_"]

    assert run(*url, "accounts", "create", "bob").exit_code == 0  # writing sets up indexes
    assert len(database["request_logs"].index_information()) > 1
