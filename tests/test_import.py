"""``burnmeter import``: mongoexport lines of the original's collections (docs/documents.md),
on both stores.

The fixtures in tests/data are written by hand in the original's shape. What the store
reads back is compared field by field with the same line decoded independently, by
pymongo's own Extended JSON reader.
"""

from __future__ import annotations

import json
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from bson import json_util

from burnmeter import schema
from burnmeter.config import default_config
from burnmeter.documents import mask_key
from burnmeter.money import to_decimal
from burnmeter.store.base import Document
from stats.exceptions import BadLine
from stats.imports import parse
from stats.imports import user_fields
from tests.cli_backends import Backend
from tests.cli_backends import backend_fixture  # noqa: F401

DATA = Path(__file__).parent / "data"
USERS = DATA / "mongoexport_users.jsonl"
LOGS = DATA / "mongoexport_logs.jsonl"
BAD_USERS = DATA / "mongoexport_users_malformed.jsonl"
BAD_LOGS = DATA / "mongoexport_logs_malformed.jsonl"
OURS = "01JH2Z8Q4N5V6W7X8Y9ZA0B1C2"  # the one log in LOGS that burnmeter wrote
SOURCE_OPTIONS = json_util.JSONOptions(tz_aware=True, tzinfo=UTC)


@pytest.fixture
def keeping(backend: Backend, tmp_path: Path) -> Backend:
    """The backend with a config that keeps logs forever: the fixtures' dates are old."""
    config = tmp_path / "keep.toml"
    config.write_text("log_ttl_days = 0\n")
    backend.options += ["--config", str(config)]
    return backend


def source(path: Path) -> list[Document]:
    """The file's documents as pymongo reads Extended JSON."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json_util.loads(line, json_options=SOURCE_OPTIONS) for line in lines]


def run_import(backend: Backend, collection: str, path: Path) -> tuple[int, dict[str, Any]]:
    result = backend.run("import", collection, str(path), "--format", "json")
    report: dict[str, Any] = json.loads(result.stdout)
    return result.exit_code, report


def assert_same(stored: Document | None, want: Document, money: set[str]) -> None:
    """Same fields, same values, same kinds of number; money exact in Decimal."""
    assert stored is not None
    assert set(stored) == set(want)
    for name, value in want.items():
        got = stored[name]
        if name in money:
            assert isinstance(got, Decimal) and got == to_decimal(str(value)), name
        elif isinstance(value, bool | float | str | datetime | ObjectId) or value is None:
            assert type(got) is type(value) and got == value, name
        else:
            assert isinstance(value, int)
            assert isinstance(got, int) and not isinstance(got, bool) and got == value, name


def test_users_keep_their_fields_types_and_keys(keeping: Backend) -> None:
    code, report = run_import(keeping, "users", USERS)
    assert (code, report) == (
        0,
        {
            "collection": "users",
            "added": 2,
            "skipped": 0,
            "expired": 0,
            "rejected": 0,
            "expired_lines": [],
            "rejects": [],
        },
    )
    store = keeping.store()
    money = set(schema.USER.named("money"))
    for doc in source(USERS):
        assert_same(store.user(doc["_id"]), doc, money)

    minh = keeping.user("minh")
    assert minh["totalInputTokens"] == 2**53 + 1  # beyond a double's exact integers
    assert minh["expiresAtNew"] == datetime(2026, 1, 20, 7, 30, 0, 123000, tzinfo=UTC)
    assert "refCredits" not in keeping.user("lan")
    owner = store.find_key(minh["apiKey"])  # the original's keys keep working
    assert owner is not None and owner.user_id == "minh"

    shown = json.loads(keeping.run("accounts", "show", "minh", "--format", "json").stdout)
    assert shown["balances"] == {"openhands": 20, "ohmygpt": 13.25}


def test_logs_keep_their_meaning(keeping: Backend) -> None:
    code, report = run_import(keeping, "logs", LOGS)
    assert (code, report["added"], report["rejected"]) == (0, 4, 0)
    store = keeping.store()
    stored = {doc["_id"]: doc for doc in store.logs(100)}
    assert len(stored) == 4
    for doc in source(LOGS):
        if doc["_id"] != OURS:  # burnmeter's own logs hold masked keys already
            doc["userKeyId"] = mask_key(doc["userKeyId"])
        assert_same(stored[doc["_id"]], doc, {"creditsCost"})

    legacy = stored[ObjectId("6750f1a2b3c4d5e6f7a8b9c0")]
    assert "creditType" not in legacy and legacy["trollKeyId"] == "openhands:k1"
    assert legacy["userKeyId"] == "sk-trol…3b4c"  # the original's whole key is not kept
    assert legacy["creditsCost"] == Decimal("0.008775")
    assert legacy["createdAt"] == datetime(2025, 12, 30, 23, 59, 59, 999000, tzinfo=UTC)
    assert stored[ObjectId("6790aa00b3c4d5e6f7a8b9c1")]["latencyMs"] == 15.5
    assert stored[ObjectId("6790aa00b3c4d5e6f7a8b9c2")]["createdAt"] == datetime(
        2026, 1, 9, 17, 0, tzinfo=UTC
    )
    ours = store.log(OURS)
    assert ours is not None and ours["ttftMs"] is None and ours["stream"] is True
    assert ours["creditsCost"] == Decimal("0.000123457")


def test_importing_again_adds_nothing(keeping: Backend) -> None:
    assert run_import(keeping, "users", USERS)[1]["added"] == 2
    assert run_import(keeping, "logs", LOGS)[1]["added"] == 4
    keeping.store().topup("minh", "credits", Decimal(1))

    assert run_import(keeping, "users", USERS) == (
        0,
        {
            "collection": "users",
            "added": 0,
            "skipped": 2,
            "expired": 0,
            "rejected": 0,
            "expired_lines": [],
            "rejects": [],
        },
    )
    code, report = run_import(keeping, "logs", LOGS)
    assert (code, report["added"], report["skipped"]) == (0, 0, 4)
    store = keeping.store()
    assert len(store.logs(100)) == 4
    assert keeping.user("minh")["credits"] == Decimal("13.5")


def test_malformed_log_lines_are_reported_and_never_half_written(keeping: Backend) -> None:
    code, report = run_import(keeping, "logs", BAD_LOGS)
    assert code == 1
    assert (report["added"], report["skipped"], report["rejected"]) == (2, 0, 9)
    assert report["rejects"] == [
        {
            "line": 2,
            "reason": "bad JSON: Expecting property name enclosed in double quotes (column 60)",
        },
        {"line": 3, "reason": "not a JSON object but an array"},
        {"line": 5, "reason": "missing _id"},
        {"line": 6, "reason": "creditsCost: expected a number, got a string"},
        {"line": 7, "reason": 'createdAt: expected a date ({"$date": ...}), got a string'},
        {"line": 8, "reason": "creditsCost: nan is not a finite number"},
        {
            "line": 9,
            "reason": "_id: bad Extended JSON: 'not-an-oid' is not a valid ObjectId, it must"
            " be a 12-byte input or a 24-character hex string",
        },
        {"line": 10, "reason": "inputTokens: expected a number, got a boolean"},
        {"line": 11, "reason": "blob: unsupported value (bytes)"},
    ]
    stored = {doc["_id"] for doc in keeping.store().logs(100)}
    assert stored == {ObjectId("6790aa00b3c4d5e6f7a8b9d0"), ObjectId("6790aa00b3c4d5e6f7a8b9d7")}

    again = keeping.run("import", "logs", str(BAD_LOGS))
    assert again.exit_code == 1
    assert again.stdout.split() == [
        "collection",
        "logs",
        "added",
        "0",
        "skipped",
        "2",
        "expired",
        "0",
        "rejected",
        "9",
    ]
    errors = again.stderr.splitlines()
    assert len(errors) == 9
    assert errors[3] == "burnmeter: line 6: creditsCost: expected a number, got a string"


@pytest.mark.parametrize(
    "args, message",
    [
        (["logs", "/nonexistent.jsonl"], "'/nonexistent.jsonl': No such file"),
        (["keys", "-"], "'keys' is not one of 'users', 'logs'"),
    ],
)
def test_usage_errors_exit_2(backend: Backend, args: list[str], message: str) -> None:
    result = backend.run("import", *args)
    assert result.exit_code == 2
    assert message in result.stderr.splitlines()[-1]


def test_logs_older_than_the_retention_are_named_and_not_imported(backend: Backend) -> None:
    result = backend.run("import", "logs", str(LOGS))
    assert result.exit_code == 0, result.stderr
    assert result.stderr == (
        "burnmeter: lines 1, 2, 3, 4: logs older than 30 days (log_ttl_days of config "
        f"{backend.options[1]}) not imported: the proxy would delete them;"
        " log_ttl_days = 0 keeps them\n"
    )
    assert result.stdout.split()[2:8] == ["added", "0", "skipped", "0", "expired", "4"]
    assert backend.store().logs(100) == []


@pytest.mark.parametrize("ttl", [0, 30])
def test_importing_logs_again_adds_nothing_whatever_the_ttl(
    backend: Backend, tmp_path: Path, ttl: int
) -> None:
    config = tmp_path / f"ttl{ttl}.toml"
    config.write_text(f"log_ttl_days = {ttl}\n")
    backend.options += ["--config", str(config)]
    first = run_import(backend, "logs", LOGS)[1]
    again = run_import(backend, "logs", LOGS)[1]
    assert first["added"] + first["expired"] == 4
    assert (again["added"], again["skipped"], again["expired"]) == (
        0,
        first["added"],
        first["expired"],
    )
    assert again["expired_lines"] == first["expired_lines"]
    assert len(backend.store().logs(100)) == first["added"]


def test_no_ttl_warning_when_logs_are_kept(keeping: Backend) -> None:
    result = keeping.run("import", "logs", str(LOGS))
    assert (result.exit_code, result.stderr) == (0, "")


def test_malformed_user_lines_from_stdin(keeping: Backend) -> None:
    result = keeping.run("import", "users", "-", "--format", "json", input=BAD_USERS.read_bytes())
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["added"], report["rejected"]) == (2, 5)
    assert report["rejects"] == [
        {"line": 2, "reason": "missing _id"},
        {"line": 3, "reason": "credits: expected a number, got a string"},
        {"line": 4, "reason": 'createdAt: expected a date ({"$date": ...}), got a string'},
        {"line": 5, "reason": "not UTF-8 (byte 25)"},
        {"line": 6, "reason": "_id: expected a string, got an ObjectId"},
    ]
    store = keeping.store()
    assert [u["_id"] for u in store.users()] == ["hoa", "khanh"]
    assert keeping.user("khanh")["creditsNew"] == Decimal(2)


FIELDS = user_fields(default_config().pools)


@pytest.mark.parametrize(
    "line, reason",
    [
        ('{"_id": "a", "credits": NaN}', "credits: nan is not a finite number"),
        ('{"_id": "a", "credits": 1e400}', "credits: inf is not a finite number"),
        ('{"_id": "a", "x": {"$numberDecimal": "Infinity"}}', "x: Infinity is not a finite number"),
        ('{"_id": "a", "x": {"y": {"$numberDouble": "-Infinity"}}}', "x.y: -inf is not a finite"),
        ('{"_id": "a", "x": {"$foo": 1}}', "x: unsupported Extended JSON $foo"),
        ('{"_id": "a", "x": {"$date": "2025-01-01T00:00:00Z", "y": 1}}', "x: bad Extended JSON"),
        ('{"_id": "a", "isActive": "yes"}', "isActive: expected a boolean, got a string"),
        (
            '{"_id": "a", "expiresAtNew": 1735689600000}',
            'expiresAtNew: expected a date ({"$date": ...}), got a number',
        ),
        (
            '{"_id": "a", "creditsNew": {"$numberDecimal": "1e999999"}}',
            "creditsNew: number out of range",
        ),
        (
            '{"_id": "a", "totalInputTokens": 9223372036854775808}',
            "totalInputTokens: 9223372036854775808 is out of range",
        ),
        ('{"_id": "a", "credits": 9300000000}', "credits: 9300000000 is out of range"),
        ('{"_id": null}', "missing _id"),
        ('"a"', "not a JSON object but a string"),
    ],
)
def test_parse_rejects(line: str, reason: str) -> None:
    with pytest.raises(BadLine) as e:
        parse(line, FIELDS)
    assert str(e.value).startswith(reason)


def test_parse_keeps_kinds_and_makes_money_exact() -> None:
    doc = parse(
        '{"_id": "a", "credits": 0.1, "creditsNew": {"$numberLong": "3"}, "n": 7, "f": 7.0,'
        ' "nested": [{"at": {"$date": "2025-01-01T07:00:00+07:00"}}], "role": null}',
        FIELDS,
    )
    assert doc == {
        "_id": "a",
        "credits": Decimal("0.1"),
        "creditsNew": Decimal(3),
        "n": 7,
        "f": 7.0,
        "nested": [{"at": datetime(2025, 1, 1, tzinfo=UTC)}],
        "role": None,
    }
    assert type(doc["n"]) is int and type(doc["f"]) is float
    assert isinstance(doc["credits"], Decimal) and isinstance(doc["creditsNew"], Decimal)


def test_imported_original_logs_print_as_json_and_csv(keeping: Backend) -> None:
    """The original's logs have ObjectId ids: JSON prints them as their hex string."""
    assert run_import(keeping, "logs", LOGS)[0] == 0
    result = keeping.run("logs", "--limit", "100", "--format", "json")
    assert result.exit_code == 0, result.output
    docs = source(LOGS)
    oids = {str(doc["_id"]) for doc in docs if isinstance(doc["_id"], ObjectId)}
    assert oids and {log["_id"] for log in json.loads(result.stdout)} >= oids
    result = keeping.run("logs", "--limit", "100", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 + len(docs)
