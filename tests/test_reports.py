"""Every report on both backends over one small dataset, against hand-computed numbers.

Reporting zone Asia/Ho_Chi_Minh (UTC+7); "now" is 2025-03-10 10:00 local (03:00Z), so
"24h" starts at 2025-03-09T17:00Z. Per log (cost USD, tokens in/out, where it falls):

    L1 alice  no creditType  16:59:59Z 03-09 (23:59:59 local)  0.10  100/10   3d 7d 30d all
    L2 alice  null           17:00:00Z 03-09 (00:00:00 local)  0.20  200/20   24h 3d ...
    L3 alice  openhands      02:30Z 03-10                      0.75 1000/100  1h 8h 24h ...
    L4 bob    ohmygpt        01:00Z 03-10, failed              0.20  300/30   8h 24h ...
    L5 bob    gemini         02:59Z 03-10, no latency          0.40  400/40   1h 8h 24h ...
    L6 dave   ohmygpt        03:00Z 03-05                      1.00 1000/100  7d 30d all
    L7 carol  openhands      2025-01-01T00:00Z                 2.00   10/1    all
    L8 alice  ohmygpt        04:00Z 03-10 (after now)          5.00   —       none
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import mongomock
import pytest

from burnmeter.config import Config
from burnmeter.config import parse_config
from burnmeter.periods import Window
from burnmeter.periods import parse_instant
from burnmeter.periods import window
from burnmeter.periods import zone
from burnmeter.reports import reports_for
from burnmeter.reports.base import Mismatch
from burnmeter.reports.base import Reports
from burnmeter.reports.base import UserUsage
from burnmeter.store.mongo import MongoStore
from burnmeter.store.sqlite import SqliteStore

D = Decimal
HCM = zone("Asia/Ho_Chi_Minh")
NOW = datetime(2025, 3, 10, 3, 0, tzinfo=UTC)

POOLS = {
    "openhands": {"balance": ["creditsNew"], "used": "creditsNewUsed", "tokens": "tokensUserNew"},
    "ohmygpt": {"balance": ["credits", "refCredits"], "used": "creditsUsed"},
    "gemini": {"balance": ["geminiCredits"], "used": "geminiUsed"},
}
CONFIG = parse_config({"pools": POOLS})
DEFAULT_CONFIG = parse_config({})

USER_DOCS: list[dict[str, Any]] = [
    {
        "_id": "alice",
        "isActive": True,
        "credits": D("10"),
        "refCredits": D("2.5"),
        "creditsUsed": D("1.5"),
        "creditsNew": D("5"),
        "creditsNewUsed": D("0.75"),
    },
    {
        "_id": "bob",
        "isActive": True,
        "credits": D("0"),
        "refCredits": D("0"),
        "creditsNew": D("0"),
        "creditsUsed": D("0.2"),
        "creditsNewUsed": D("0"),
        "geminiCredits": D("3"),
        "geminiUsed": D("0.4"),
    },
    {"_id": "carol", "isActive": True, "credits": D("0"), "creditsNew": D("0")},
    {
        "_id": "dave",
        "isActive": False,
        "credits": D("0"),
        "refCredits": D("0.25"),
        "creditsUsed": D("1.0000005"),
    },
]


def _log(
    n: int, user: str, pool: str | None, at: str, cost: str, tokens: tuple[int, int], **more: Any
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": f"L{n}",
        "userId": user,
        "model": more.pop("model", "m-a"),
        "inputTokens": tokens[0],
        "outputTokens": tokens[1],
        "creditsCost": D(cost),
        "statusCode": 200,
        "isSuccess": True,
        "latencyMs": 1000,
        "createdAt": datetime.fromisoformat(at),
    }
    if pool != "missing":
        doc["creditType"] = pool
    return doc | more


LOG_DOCS = [
    _log(1, "alice", "missing", "2025-03-09T16:59:59Z", "0.10", (100, 10)),
    _log(2, "alice", None, "2025-03-09T17:00:00Z", "0.20", (200, 20), latencyMs=2000),
    _log(
        3,
        "alice",
        "openhands",
        "2025-03-10T02:30:00Z",
        "0.75",
        (1000, 100),
        model="m-b",
        cacheWriteTokens=50,
        cacheHitTokens=500,
        latencyMs=500,
    ),
    _log(
        4,
        "bob",
        "ohmygpt",
        "2025-03-10T01:00:00Z",
        "0.20",
        (300, 30),
        statusCode=500,
        isSuccess=False,
        latencyMs=300,
    ),
    _log(
        5, "bob", "gemini", "2025-03-10T02:59:00Z", "0.40", (400, 40), model="m-c", latencyMs=None
    ),
    _log(6, "dave", "ohmygpt", "2025-03-05T03:00:00Z", "1.00", (1000, 100), latencyMs=1500),
    _log(
        7, "carol", "openhands", "2025-01-01T00:00:00Z", "2.00", (10, 1), model="m-b", latencyMs=100
    ),
    _log(8, "alice", "ohmygpt", "2025-03-10T04:00:00Z", "5.00", (9, 9)),
]


def sqlite_reports(tmp_path: Path, config: Config, logs: list[Any]) -> Iterator[Reports]:
    store = SqliteStore(tmp_path / "reports.db", config.pools)
    store.ensure_schema(0)
    for doc in USER_DOCS:
        store.import_user(doc)
    for doc in logs:
        store.import_log(doc)
    yield reports_for(store)
    store.close()


def mongo_reports(tmp_path: Path, config: Config, logs: list[Any]) -> Iterator[Reports]:
    store = MongoStore(mongomock.MongoClient(tz_aware=True)["fproxy"], config.pools)
    store.ensure_schema(0)
    for doc in USER_DOCS:
        store.import_user(doc)
    for doc in logs:
        store.import_log(doc)
    yield reports_for(store)
    store.close()


BACKENDS: dict[str, Callable[[Path, Config, list[Any]], Iterator[Reports]]] = {
    "sqlite": sqlite_reports,
    "mongo": mongo_reports,
}


@pytest.fixture(params=list(BACKENDS))
def make_reports(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[Config], Reports]]:
    made: list[Iterator[Reports]] = []

    def make(config: Config = CONFIG, logs: list[Any] = LOG_DOCS) -> Reports:
        made.append(BACKENDS[request.param](tmp_path, config, logs))
        return next(made[-1])

    yield make
    for gen in made:
        next(gen, None)


def at(period: str, tz: str = "Asia/Ho_Chi_Minh") -> Window:
    return window(period, zone(tz), NOW)


# -- summary ------------------------------------------------------------------------------
def test_summary_24h_starts_at_local_midnight(make_reports: Callable[..., Reports]) -> None:
    s = make_reports().summary(at("24h")).as_dict()
    assert s == {
        "total_users": 4,
        "total_credits": D("10"),
        "total_ref_credits": D("2.75"),
        "total_creditsNew": D("5"),
        "total_credits_used": D("0.40"),  # L2 (null creditType) + L4; not L1 at 23:59:59
        "total_creditsNewUsed": D("0.75"),
        "total_burned": D("1.55"),
        "burned_by_pool": {"openhands": D("0.75"), "ohmygpt": D("0.40"), "gemini": D("0.40")},
        "total_input_tokens": 1900,
        "total_output_tokens": 190,
        "requests": 4,
        "success_rate": 75.0,
        "avg_latency_ms": 933,  # (2000 + 500 + 300) / 3, L5 has none
        "active_users": 2,
        "period": "24h",
        "window_start": datetime(2025, 3, 10, 0, 0, tzinfo=HCM),
        "window_end": datetime(2025, 3, 10, 10, 0, tzinfo=HCM),
    }


def test_a_log_without_a_user_is_counted_but_belongs_to_no_user(
    make_reports: Callable[..., Reports],
) -> None:
    """The original wrote no userId for requests on its own operator key."""
    orphans = [
        _log(9, "nobody", "openhands", "2025-03-10T02:00:00Z", "0.50", (1, 1)),
        _log(10, "nobody", "ohmygpt", "2025-03-10T02:00:00Z", "0.50", (1, 1)),
    ]
    for orphan in orphans:
        del orphan["userId"]
    reports = make_reports(logs=[*LOG_DOCS, *orphans])
    s = reports.summary(at("24h"))
    assert (s.requests, s.new_burned, s.active_users) == (6, D("1.25"), 2)
    assert all(u.user for u in reports.users(at("24h")))
    assert reports.reconcile(D("0.000001")) == [  # as without them (test_reconcile)
        Mismatch("alice", "ohmygpt", D("1.5"), D("5.30")),
        Mismatch("carol", "openhands", D(0), D("2.00")),
    ]


def test_whole_float_token_counts_are_summed(make_reports: Callable[..., Reports]) -> None:
    floats = _log(9, "bob", "ohmygpt", "2025-03-10T02:00:00Z", "0.50", (0, 0))
    floats |= {"inputTokens": 5000.0, "outputTokens": 60.0}  # as mongoexport writes doubles
    s = make_reports(logs=[*LOG_DOCS, floats]).summary(at("24h"))
    assert (s.input_tokens, s.output_tokens) == (1900 + 5000, 190 + 60)


def test_summary_all_counts_legacy_as_ohmygpt_and_funded_users(
    make_reports: Callable[..., Reports],
) -> None:
    s = make_reports().summary(at("all"))
    assert s.burned == D("1.50")  # L1 + L2 + L4 + L6
    assert s.new_burned == D("2.75")  # L3 + L7
    assert s.burned_by_pool == {"openhands": D("2.75"), "ohmygpt": D("1.50"), "gemini": D("0.40")}
    assert s.total_burned == D("4.65")  # L8 lies after now
    assert (s.input_tokens, s.output_tokens, s.requests) == (3010, 301, 7)
    assert s.success_rate == 85.71
    assert s.avg_latency_ms == 900  # 5400 / 6
    assert s.active_users == 3  # alice, bob (gemini), dave (refCredits); not carol
    assert s.window.local_start is None


def test_the_original_fields_follow_the_pools_counting_their_counters(
    make_reports: Callable[..., Reports],
) -> None:
    """ "Burned" is the pool counting creditsUsed (whatever its name) plus the logs without
    creditType; "New Burned" the pool counting creditsNewUsed; not the names ohmygpt and
    openhands."""
    renamed = {
        "classic": POOLS["ohmygpt"],
        "fresh": POOLS["openhands"],
        "ohmygpt": {"balance": ["geminiCredits"], "used": "geminiUsed"},
    }
    logs = [
        _log(1, "alice", None, "2025-03-10T02:00:00Z", "0.10", (1, 1)),
        _log(2, "alice", "classic", "2025-03-10T02:00:00Z", "0.20", (1, 1)),
        _log(3, "bob", "fresh", "2025-03-10T02:00:00Z", "0.40", (1, 1)),
        _log(4, "bob", "ohmygpt", "2025-03-10T02:00:00Z", "0.80", (1, 1)),
    ]
    s = make_reports(parse_config({"pools": renamed}), logs).summary(at("24h"))
    assert (s.burned, s.new_burned, s.total_burned) == (D("0.30"), D("0.40"), D("1.50"))
    assert s.burned_by_pool == {"classic": D("0.30"), "fresh": D("0.40"), "ohmygpt": D("0.80")}
    without = make_reports(parse_config({"pools": {"gemini": POOLS["gemini"]}}), logs)
    s = without.summary(at("24h"))
    assert (s.burned, s.new_burned) == (D("0.10"), D(0))  # the legacy logs alone


def test_summary_rolling_windows(make_reports: Callable[..., Reports]) -> None:
    reports = make_reports()
    one = reports.summary(at("1h"))
    assert (one.requests, one.burned, one.new_burned, one.total_burned) == (
        2,
        0,
        D("0.75"),
        D("1.15"),
    )
    assert (one.success_rate, one.avg_latency_ms, one.active_users) == (100.0, 500, 2)
    assert reports.summary(at("8h")).requests == 3  # L3 L4 L5: L2 is 10 h old
    assert reports.summary(at("3d")).burned == D("0.50")  # L1 L2 L4
    assert reports.summary(at("7d")).active_users == 3  # alice bob dave
    assert reports.summary(at("30d")).new_burned == D("0.75")  # L7 is older


def test_summary_other_zones(make_reports: Callable[..., Reports]) -> None:
    reports = make_reports()
    # UTC midnight 03-10T00:00Z: L3 L4 L5.  Kolkata (+05:30) midnight 03-09T18:30Z: the same.
    assert reports.summary(at("24h", "UTC")).requests == 3
    assert reports.summary(at("24h", "Asia/Kolkata")).requests == 3
    # New York: now is 23:00 EDT on 03-09, a DST day; it began 05:00Z (EST): L1 to L5.
    assert reports.summary(at("24h", "America/New_York")).requests == 5


def test_summary_pools_seen_in_logs_but_not_configured(
    make_reports: Callable[..., Reports],
) -> None:
    s = make_reports(DEFAULT_CONFIG).summary(at("24h"))
    assert list(s.burned_by_pool) == ["openhands", "ohmygpt", "gemini"]
    assert (
        make_reports(DEFAULT_CONFIG).summary(at("all")).active_users == 2
    )  # bob's gemini is not a pool


def test_summary_custom_range(make_reports: Callable[..., Reports]) -> None:
    since = parse_instant("2025-03-09T23:00", HCM)
    until = parse_instant("2025-03-10T00:00:00+07:00", HCM)
    s = make_reports().summary(window(None, HCM, NOW, since, until))
    assert (s.window.period, s.requests, s.burned) == ("custom", 1, D("0.10"))  # L1 only


def test_summary_empty_window(make_reports: Callable[..., Reports]) -> None:
    s = make_reports().summary(window(None, HCM, NOW, until=parse_instant("2024-01-01", HCM)))
    assert (s.requests, s.total_burned, s.active_users) == (0, 0, 0)
    assert (s.success_rate, s.avg_latency_ms) == (None, None)
    assert s.burned_by_pool == {"openhands": 0, "ohmygpt": 0, "gemini": 0}


# -- users, models, series ----------------------------------------------------------------
def test_users_by_total_cost_then_pool_order(make_reports: Callable[..., Reports]) -> None:
    rows = make_reports().users(at("24h"))
    assert rows == [
        UserUsage("alice", "openhands", D("0.75"), 1000, 100, 1),
        UserUsage("alice", "ohmygpt", D("0.20"), 200, 20, 1),
        UserUsage("bob", "ohmygpt", D("0.20"), 300, 30, 1),
        UserUsage("bob", "gemini", D("0.40"), 400, 40, 1),
    ]


def test_users_top(make_reports: Callable[..., Reports]) -> None:
    reports = make_reports()
    assert {r.user for r in reports.users(at("all"), top=2)} == {"carol", "alice"}  # 2.00, 1.05
    assert reports.users(at("1h"), top=0) == []


def test_models(make_reports: Callable[..., Reports]) -> None:
    rows = make_reports().models(at("24h"))
    assert [
        (
            m.model,
            m.requests,
            m.input_tokens,
            m.output_tokens,
            m.cache_write_tokens,
            m.cache_read_tokens,
            m.cost,
        )
        for m in rows
    ] == [
        ("m-b", 1, 1000, 100, 50, 500, D("0.75")),
        ("m-a", 2, 500, 50, 0, 0, D("0.40")),  # ties m-c on cost, more requests
        ("m-c", 1, 400, 40, 0, 0, D("0.40")),
    ]


def test_series_hours_of_today(make_reports: Callable[..., Reports]) -> None:
    rows = make_reports().series(at("24h"), "hour")
    assert [r.start.hour for r in rows] == list(range(10))
    assert rows[0].start == datetime(2025, 3, 10, 0, 0, tzinfo=HCM)
    assert rows[-1].end == datetime(2025, 3, 10, 10, 0, tzinfo=HCM)
    spent = {r.start.hour: r.burned for r in rows if r.total}
    assert spent == {
        0: {"openhands": 0, "ohmygpt": D("0.20"), "gemini": 0},
        8: {"openhands": 0, "ohmygpt": D("0.20"), "gemini": 0},
        9: {"openhands": D("0.75"), "ohmygpt": 0, "gemini": D("0.40")},
    }


def test_series_days(make_reports: Callable[..., Reports]) -> None:
    reports = make_reports()
    rows = reports.series(at("3d"), "day")  # from 03-07 10:00 local
    assert [r.start.day for r in rows] == [7, 8, 9, 10]
    assert [r.total for r in rows] == [0, 0, D("0.10"), D("1.55")]
    everything = reports.series(at("all"), "day")  # from L7's day, 2025-01-01 local
    assert len(everything) == 31 + 28 + 10
    assert everything[0].burned["openhands"] == D("2.00")
    assert sum((r.total for r in everything), D(0)) == D("4.65")


def test_series_in_a_half_hour_zone(make_reports: Callable[..., Reports]) -> None:
    rows = make_reports().series(at("24h", "Asia/Kolkata"), "hour")  # 00:00 → 08:30 IST
    assert rows[0].start == datetime(2025, 3, 10, 0, 0, tzinfo=zone("Asia/Kolkata"))
    assert len(rows) == 9
    spent = {r.start.hour: r.total for r in rows if r.total}
    assert spent == {6: D("0.20"), 8: D("1.15")}  # L4 06:30 IST; L3 08:00 and L5 08:29 IST


# -- reconcile ----------------------------------------------------------------------------
def test_reconcile(make_reports: Callable[..., Reports]) -> None:
    reports = make_reports()
    assert reports.reconcile(D("0.000001")) == [  # every log, L8 (after "now") too
        Mismatch("alice", "ohmygpt", D("1.5"), D("5.30")),  # L1 (legacy) + L2 (null) + L8
        Mismatch("carol", "openhands", D(0), D("2.00")),  # no counter at all
    ]
    tight = reports.reconcile(D("0.0000001"))
    assert Mismatch("dave", "ohmygpt", D("1.0000005"), D("1.00")) in tight
    assert tight[-1].difference == D("0.0000005")


# -- metrics and accounts (the admin server's) --------------------------------------------
def test_metrics_over_the_window(make_reports: Callable[..., Reports]) -> None:
    logs = [doc | {"tokensUsed": 7 * n} for n, doc in enumerate(LOG_DOCS, 1)]
    m = make_reports(CONFIG, logs).metrics(at("24h"))
    assert m.requests == 4  # L2-L5
    assert m.tokens_used == 7 * (2 + 3 + 4 + 5)
    assert m.success_rate == 75.0 and m.avg_latency_ms == 933  # as the summary's
    assert m.as_dict()["timestamp"] == datetime(2025, 3, 10, 10, tzinfo=HCM)


def test_accounts_rank_spenders_then_list_everyone_with_balances(
    make_reports: Callable[..., Reports],
) -> None:
    accounts = make_reports().accounts(at("24h"))
    assert [a.user for a in accounts] == ["alice", "bob", "carol", "dave"]
    alice, bob, carol, dave = accounts
    assert alice.burned_by_pool == {"openhands": D("0.75"), "ohmygpt": D("0.20")}
    assert alice.burned == D("0.95") and alice.requests == 2
    assert alice.last_activity == datetime(2025, 3, 10, 2, 30, tzinfo=UTC)  # L8 is after now
    assert alice.balances == {"openhands": D("5"), "ohmygpt": D("12.5"), "gemini": D("0")}
    assert bob.balances["gemini"] == D("3")
    assert carol.requests == 0 and carol.last_activity is None and carol.burned == 0
    assert dave.balances == {"openhands": D("0"), "ohmygpt": D("0.25"), "gemini": D("0")}
    assert [a.user for a in make_reports().accounts(at("24h"), top=1)] == ["alice"]


def test_balances_count_a_field_that_is_no_number_as_zero(tmp_path: Path) -> None:
    db = mongomock.MongoClient(tz_aware=True)["fproxy"]
    store = MongoStore(db, CONFIG.pools)
    db["usersNew"].insert_one(
        {"_id": "old", "credits": "12", "refCredits": 1.5, "creditsNew": None}
    )
    balances = reports_for(store).backend.balances(list(CONFIG.pools.values()))
    assert balances["old"] == {"openhands": D(0), "ohmygpt": D("1.5"), "gemini": D(0)}


def test_user_usage_of_one_user(make_reports: Callable[..., Reports]) -> None:
    """The usage endpoint's query: one user's rows, as the all-users query has them."""
    backend = make_reports().backend
    for span in (at("24h"), at("all"), None):
        everyone = backend.user_usage(span)
        for user in ("alice", "bob", "nobody"):
            mine = sorted(backend.user_usage(span, user), key=str)
            assert mine == sorted((r for r in everyone if r.user == user), key=str)
            assert bool(mine) is (user != "nobody")
