"""``burnmeter accounts``: create, topup, show, disable, on both stores through the CLI."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal

import pytest
from click.testing import CliRunner

from burnmeter.documents import KEY_PREFIX
from burnmeter.documents import hash_key
from burnmeter.documents import utcnow
from stats.cli import cli
from tests.cli_backends import Backend
from tests.cli_backends import backend_fixture  # noqa: F401


def create(backend: Backend, *args: str) -> str:
    """Create a user with ``--format json``; the key it printed."""
    result = backend.run("accounts", "create", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return str(json.loads(result.stdout)["key"])


def show(backend: Backend, user: str) -> dict[str, object]:
    result = backend.run("accounts", "show", user, "--format", "json")
    assert result.exit_code == 0, result.stderr
    shown: dict[str, object] = json.loads(result.stdout)
    return shown


def error_line(stderr: str) -> str:
    """The one line a usage error ends with, after click's usage reminder."""
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def test_create_puts_credits_in_the_pool_and_show_reports_them(backend: Backend) -> None:
    created = backend.run("accounts", "create", "alice", "--pool", "openhands=5")
    assert created.exit_code == 0, created.stderr
    shown = show(backend, "alice")
    assert shown["_id"] == "alice"
    assert shown["creditsNew"] == 5
    assert shown["isActive"] is True
    assert shown["balances"] == {"openhands": 5, "ohmygpt": 0}
    assert shown["expiresAtNew"] is None  # no --expires-days: never expires
    assert backend.user("alice")["creditsNew"] == Decimal(5)


def test_the_key_is_printed_once_and_only_its_hash_is_stored(backend: Backend) -> None:
    result = backend.run("accounts", "create", "alice", "--pool", "ohmygpt=2.5")
    assert result.exit_code == 0, result.stderr
    printed = [w for w in result.stdout.split() if w.startswith(KEY_PREFIX)]
    assert len(printed) == 1
    key = printed[0]

    stored = backend.raw_bytes()
    assert hash_key(key).encode() in stored  # the search does see the store's content
    assert key.encode() not in stored
    assert key.removeprefix(KEY_PREFIX).encode() not in stored

    owner = backend.store().find_key(key)
    assert owner is not None and owner.user_id == "alice"
    assert owner.key_doc_id == hash_key(key) and owner.key_active
    assert key not in backend.run("accounts", "show", "alice").stdout


def test_create_prints_the_key_as_json_and_csv(backend: Backend) -> None:
    key = create(backend, "alice")
    assert backend.store().find_key(key) is not None
    result = backend.run("accounts", "create", "bob", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    (row,) = list(csv.DictReader(io.StringIO(result.stdout)))
    assert row["user"] == "bob" and row["key"].startswith(KEY_PREFIX)
    assert row["key"] != key
    owner = backend.store().find_key(row["key"])
    assert owner is not None and owner.user_id == "bob"


def test_create_fills_several_pools_and_sets_expiry(backend: Backend) -> None:
    before = utcnow()
    create(
        backend, "alice", "--pool", "openhands=1.5", "--pool", "ohmygpt=2", "--expires-days", "7"
    )
    user = backend.user("alice")
    assert (user["creditsNew"], user["credits"]) == (Decimal("1.5"), Decimal(2))
    for field in ("expiresAtNew", "expiresAt"):
        assert before + timedelta(days=7) - timedelta(seconds=1) <= user[field]
        assert user[field] <= utcnow() + timedelta(days=7)


def test_topup_adds_exactly_and_prints_the_pool_balance(backend: Backend) -> None:
    create(backend, "alice")
    first = backend.run("accounts", "topup", "alice", "--pool", "ohmygpt", "--amount", "0.1")
    second = backend.run("accounts", "topup", "alice", "--pool", "ohmygpt", "--amount", "0.2")
    assert (first.exit_code, second.exit_code) == (0, 0), second.stderr
    assert first.stdout == "alice: ohmygpt balance 0.1 USD\n"
    assert second.stdout == "alice: ohmygpt balance 0.3 USD\n"
    user = backend.user("alice")
    assert user["credits"] == Decimal("0.3")
    assert "refCredits" not in user or user["refCredits"] == 0
    assert show(backend, "alice")["balances"] == {"openhands": 0, "ohmygpt": 0.3}


def test_topup_with_expiry_and_nine_decimal_places(backend: Backend) -> None:
    create(backend, "alice", "--pool", "openhands=1")
    result = backend.run(
        "accounts",
        "topup",
        "alice",
        "--pool",
        "openhands",
        "--amount",
        "0.000000001",
        "--expires-days",
        "30",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "alice: openhands balance 1.000000001 USD\n"
    user = backend.user("alice")
    assert user["creditsNew"] == Decimal("1.000000001")
    assert user["expiresAtNew"] > utcnow() + timedelta(days=29)


def test_disable_deactivates_the_user_its_key_finds(backend: Backend) -> None:
    key = create(backend, "alice", "--pool", "openhands=5")
    result = backend.run("accounts", "disable", "alice")
    assert result.exit_code == 0, result.stderr
    assert "within 30 s" in result.stdout
    owner = backend.store().find_key(key)
    assert owner is not None and owner.user["isActive"] is False
    assert show(backend, "alice")["isActive"] is False


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "alice"], "'alice' exists"),
        (["topup", "bob", "--pool", "ohmygpt", "--amount", "1"], "no user 'bob'"),
        (["show", "bob"], "no user 'bob'"),
        (["disable", "bob"], "no user 'bob'"),
    ],
)
def test_runtime_errors_are_one_line_and_exit_1(
    backend: Backend, args: list[str], message: str
) -> None:
    create(backend, "alice", "--pool", "openhands=5")
    result = backend.run("accounts", *args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("burnmeter: error:") and message in result.stderr
    assert show(backend, "alice")["creditsNew"] == 5  # nothing changed


@pytest.mark.parametrize("error", [TypeError, KeyError, ValueError, LookupError])
def test_a_bug_is_one_line_naming_it_and_debug_shows_the_traceback(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    create(backend, "alice")

    def broken(*_: object) -> None:
        raise error("Object of type X is not JSON serializable")

    monkeypatch.setattr("burnmeter.store.sqlite.SqliteStore.user", broken)
    monkeypatch.setattr("burnmeter.store.mongo.MongoStore.user", broken)
    result = backend.run("accounts", "show", "alice")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"burnmeter: internal error: {error.__name__}: ")
    assert result.stderr.endswith(" (--debug shows the traceback)\n")
    assert len(result.stderr.splitlines()) == 1

    debug = CliRunner().invoke(cli, ["--debug", *backend.options, "accounts", "show", "alice"])
    assert debug.exit_code == 1
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert "in broken" in debug.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["topup", "alice", "--pool", "ohmygpt", "--amount", "0"], "not a positive amount"),
        (["topup", "alice", "--pool", "ohmygpt", "--amount", "-1"], "not a positive amount"),
        (["topup", "alice", "--pool", "ohmygpt", "--amount", "NaN"], "not a positive amount"),
        (["topup", "alice", "--pool", "ohmygpt", "--amount", "1,5"], "not a decimal number"),
        (["topup", "alice", "--pool", "ohmygpt", "--amount", "0.0000000001"], "9 decimal places"),
        (["topup", "alice", "--pool", "ohmygpt", "--amount", "1e10"], "more than"),
        (["topup", "alice", "--pool", "gemini", "--amount", "1"], "pools: openhands, ohmygpt"),
        (["topup", "alice", "--amount", "1"], "Missing option '--pool'"),
        (["create", "carol", "--pool", "openhands"], "not NAME=AMOUNT"),
        (["create", "carol", "--pool", "openhands=0.1234567891"], "9 decimal places"),
        (["create", "carol", "--pool", "gemini=1"], "unknown pool 'gemini'"),
        (["create", "carol", "--pool", "ohmygpt=1", "--pool", "ohmygpt=2"], "named twice"),
        (["create", "carol", "--expires-days", "7"], "'--expires-days'"),
        (["create", "carol", "--pool", "openhands=1", "--expires-days", "0"], "'--expires-days'"),
        (["create", "carol", "--pool", "openhands=1", "--expires-days", "99999999"], "36500"),
        (["create", " carol", "--pool", "openhands=1"], "not a user name"),
    ],
)
def test_usage_errors_exit_2_with_one_error_line_and_change_nothing(
    backend: Backend, args: list[str], message: str
) -> None:
    create(backend, "alice", "--pool", "ohmygpt=1")
    result = backend.run("accounts", *args)
    assert result.exit_code == 2
    assert message in error_line(result.stderr)
    store = backend.store()
    assert store.user("carol") is None and store.user(" carol") is None
    assert backend.user("alice")["credits"] == Decimal(1)


def test_show_prints_a_table_and_csv_with_pool_sums(backend: Backend) -> None:
    create(backend, "alice", "--pool", "ohmygpt=1.25")
    backend.store().topup("alice", "refCredits", Decimal("0.5"))
    table = backend.run("accounts", "show", "alice").stdout.splitlines()
    assert "balances.ohmygpt    1.75" in table
    assert any(line.split() == ["credits", "1.25"] for line in table)
    (row,) = csv.DictReader(
        io.StringIO(backend.run("accounts", "show", "alice", "--format", "csv").stdout)
    )
    assert (row["_id"], row["refCredits"], row["balances.ohmygpt"]) == ("alice", "0.5", "1.75")


def test_rotate_key_gives_a_new_key_and_stops_every_old_one(backend: Backend) -> None:
    old = create(backend, "alice", "--pool", "openhands=5")
    backend.store().set_fields(
        "alice", {"apiKey": "sk-legacy-raw-key"}
    )  # the original's (docs/documents.md)
    result = backend.run("accounts", "rotate-key", "alice", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rotated = json.loads(result.stdout)
    assert (rotated["user"], rotated["keys_stopped"]) == ("alice", 2)
    store = backend.store()
    for key in (old, "sk-legacy-raw-key"):
        owner = store.find_key(key)
        assert owner is None or owner.key_active is False, key
    new = store.find_key(rotated["key"])
    assert new is not None and new.key_active and new.user_id == "alice"
    assert rotated["key"].encode() not in backend.raw_bytes()


def test_list_and_enable(backend: Backend) -> None:
    create(backend, "alice", "--pool", "ohmygpt=1.25")
    create(backend, "bob")
    assert backend.run("accounts", "disable", "bob").exit_code == 0
    listed = list(
        csv.DictReader(io.StringIO(backend.run("accounts", "list", "--format", "csv").stdout))
    )
    assert [(r["user"], r["active"], r["ohmygpt"]) for r in listed] == [
        ("alice", "True", "1.25"),
        ("bob", "False", "0"),
    ]
    assert backend.run("accounts", "enable", "bob").exit_code == 0
    assert backend.user("bob")["isActive"] is True
