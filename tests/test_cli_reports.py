"""The report commands end to end through click, on the SQLite store, over test_reports' data."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from click.testing import Result

from burnmeter.config import load_config
from burnmeter.store.sqlite import SqliteStore
from stats.cli import cli
from tests.test_reports import LOG_DOCS
from tests.test_reports import USER_DOCS

NOW = ["--now", "2025-03-10T10:00"]  # Asia/Ho_Chi_Minh: 03:00Z
CONFIG = """
timezone = "Asia/Ho_Chi_Minh"
log_ttl_days = {ttl}

[pools.openhands]
balance = ["creditsNew"]
used = "creditsNewUsed"

[pools.ohmygpt]
balance = ["credits", "refCredits"]
used = "creditsUsed"

[pools.gemini]
balance = ["geminiCredits"]
used = "geminiUsed"
"""


def _setup(tmp_path: Path, ttl: int = 0, data: bool = True) -> list[str]:
    """An SQLite store, with test_reports' documents unless ``data`` is false (empty)."""
    config = tmp_path / "burnmeter.toml"
    config.write_text(CONFIG.format(ttl=ttl))
    db = tmp_path / "cli.db"
    store = SqliteStore(db, load_config(config).pools)
    store.ensure_schema(0)
    if data:
        for doc in USER_DOCS:
            store.import_user(doc)
        for doc in LOG_DOCS:
            store.import_log(doc)
    store.close()
    return ["--db", f"sqlite:///{db}", "--config", str(config)]


Run = Callable[..., Result]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    base = _setup(tmp_path)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, [*base, *args], catch_exceptions=False)

    return invoke


def test_summary_json_has_the_spec_fields_in_order(run: Run) -> None:
    result = run("summary", "--period", "24h", *NOW, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "total_users": 4,
        "total_credits": 10,
        "total_ref_credits": 2.75,
        "total_creditsNew": 5,
        "total_credits_used": 0.4,
        "total_creditsNewUsed": 0.75,
        "total_burned": 1.55,
        "burned_by_pool": {"openhands": 0.75, "ohmygpt": 0.4, "gemini": 0.4},
        "total_input_tokens": 1900,
        "total_output_tokens": 190,
        "requests": 4,
        "success_rate": 75.0,
        "avg_latency_ms": 933,
        "active_users": 2,
        "period": "24h",
        "window_start": "2025-03-10T00:00:00+07:00",
        "window_end": "2025-03-10T10:00:00+07:00",
    }
    assert list(json.loads(result.stdout))[:4] == [
        "total_users",
        "total_credits",
        "total_ref_credits",
        "total_creditsNew",
    ]


def test_summary_table_for_people(run: Run) -> None:
    out = run("summary", *NOW).stdout  # 24h by default
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "0.4000 USD" in lines["Burned"] and "legacy" in lines["Burned"]
    assert "0.7500 USD" in lines["New Burned"]
    assert "1.5500 USD" in lines["Burned, all pools"]
    assert "4 (75% ok)" in lines["Requests"]
    assert "2025-03-10 00:00 → 2025-03-10 10:00" in lines["Period"]


def test_summary_csv_flattens_pools(run: Run) -> None:
    header, row = run("summary", "--period", "all", *NOW, "--format", "csv").stdout.splitlines()
    values = dict(zip(header.split(","), row.split(","), strict=True))
    assert values["burned_by_pool.gemini"] == "0.4"
    assert values["total_credits_used"] == "1.5"
    assert values["window_start"] == ""
    assert values["active_users"] == "3"


def test_summary_tz_and_custom_range(run: Run) -> None:
    ny = json.loads(
        run(
            "summary", "--tz", "America/New_York", "--now", "2025-03-10T03:00Z", "--format", "json"
        ).stdout
    )
    assert (ny["requests"], ny["window_start"]) == (5, "2025-03-09T00:00:00-05:00")
    custom = json.loads(
        run(
            "summary", "--since", "2025-03-09T23:00", "--until", "2025-03-10", "--format", "json"
        ).stdout
    )
    assert (custom["period"], custom["requests"], custom["total_credits_used"]) == (
        "custom",
        1,
        0.1,
    )


def test_summary_of_an_empty_store(tmp_path: Path) -> None:
    base = _setup(tmp_path, data=False)
    result = CliRunner().invoke(cli, [*base, "summary", "--period", "all", "--format", "json"])
    assert result.exit_code == 0, result.output
    s = json.loads(result.stdout)
    assert (s["total_users"], s["requests"], s["total_burned"], s["active_users"]) == (0, 0, 0, 0)
    assert (s["success_rate"], s["avg_latency_ms"]) == (None, None)
    assert s["burned_by_pool"] == {"openhands": 0, "ohmygpt": 0, "gemini": 0}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--period", "5h"], "'1h', '2h', '3h', '4h', '8h', '24h', '3d', '7d', '30d', 'all'"),
        (["--tz", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["--since", "last week"], "not an ISO 8601 time"),
        (["--period", "8h", "--since", "2025-03-01"], "not both"),
        (["--since", "2025-03-02", "--until", "2025-03-01"], "earlier"),
        (["--tz", "America"], "unknown time zone 'America'"),  # a directory of zones
        (["--now", "0001-01-01"], "out of range"),
        (["--now", "0001-01-05T00:00+00:00", "--period", "30d"], "too early"),
    ],
)
def test_bad_usage_exits_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["summary", *args])
    assert result.exit_code == 2
    assert message in result.stderr


def test_users_top_csv(run: Run) -> None:
    out = run("users", "--period", "24h", *NOW, "--top", "1", "--format", "csv").stdout
    assert out.splitlines() == [
        "user,pool,cost,input_tokens,output_tokens,requests",
        "alice,openhands,0.75,1000,100,1",
        "alice,ohmygpt,0.2,200,20,1",
    ]


def test_models_json(run: Run) -> None:
    rows = json.loads(run("models", "--period", "24h", *NOW, "--format", "json").stdout)
    assert [(r["model"], r["requests"], r["cache_read_tokens"], r["cost"]) for r in rows] == [
        ("m-b", 1, 500, 0.75),
        ("m-a", 2, 0, 0.4),
        ("m-c", 1, 0, 0.4),
    ]


def test_series_json_and_table(run: Run) -> None:
    rows = json.loads(run("series", "--period", "24h", *NOW, "--format", "json").stdout)
    assert len(rows) == 10
    assert rows[9] == {
        "start": "2025-03-10T09:00:00+07:00",
        "end": "2025-03-10T10:00:00+07:00",
        "burned": {"openhands": 0.75, "ohmygpt": 0, "gemini": 0.4},
        "total": 1.15,
    }
    table = run("series", "--period", "3d", "--bucket", "day", *NOW).stdout.splitlines()
    assert table[0].split() == ["start", "openhands", "ohmygpt", "gemini", "total"]
    assert len(table) == 2 + 4


def test_series_plot(run: Run, tmp_path: Path) -> None:
    png = tmp_path / "spend.png"
    result = run("series", "--period", "7d", "--bucket", "day", *NOW, "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_series_plot_without_matplotlib(
    run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = run("series", *NOW, "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert (
        result.stderr
        == "burnmeter: error: --plot needs matplotlib: pip install 'burnmeter[plot]'\n"
    )


def test_logs_newest_first(run: Run) -> None:
    docs = json.loads(run("logs", "--limit", "2", "--format", "json").stdout)
    assert [d["_id"] for d in docs] == ["L8", "L5"]
    assert docs[0]["createdAt"] == "2025-03-10T04:00:00+00:00"
    bob = run("logs", "--user", "bob", "--format", "csv").stdout.splitlines()
    assert bob[0].startswith("createdAt,userId,model,creditType")
    assert [line.split(",")[1] for line in bob[1:]] == ["bob", "bob"]
    assert bob[1].startswith("2025-03-10T09:59:00+07:00")  # L5, in the reporting zone


def test_reconcile(run: Run) -> None:
    result = run("reconcile", "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == [
        {"user": "alice", "pool": "ohmygpt", "used": 1.5, "logged": 5.3, "difference": -3.8},
        {"user": "carol", "pool": "openhands", "used": 0, "logged": 2, "difference": -2},
    ]
    tight = json.loads(run("reconcile", "--tolerance", "0.0000001", "--format", "json").stdout)
    assert [r["user"] for r in tight] == ["alice", "carol", "dave"]


def test_reconcile_notes_the_ttl(tmp_path: Path) -> None:
    base = _setup(tmp_path, ttl=30, data=False)
    result = CliRunner().invoke(cli, [*base, "reconcile"])
    assert result.exit_code == 0
    assert result.stdout == "(no rows)\n"
    assert "older than 30 days" in result.stderr
