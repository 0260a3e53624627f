"""The behaviour every store backend must share (SQLite, MongoDB via mongomock)."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal as D

import pytest
from bson.objectid import ObjectId
from stores import POOLS
from stores import key_doc
from stores import put_key

from burnmeter.documents import hash_key
from burnmeter.documents import key_ref
from burnmeter.documents import request_log
from burnmeter.documents import usage_of_log
from burnmeter.records import UsageRecord
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store

OPENHANDS = POOLS["openhands"]
OHMYGPT = POOLS["ohmygpt"]
T0 = datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)


def settlement(
    request_id: str,
    cost: str,
    *,
    user: str = "alice",
    pool: str = "openhands",
    key: str | None = "sk-alice",
    created_at: datetime = T0,
    usage: UsageRecord | None = None,
) -> Settlement:
    usage = usage or UsageRecord(input_tokens=100, output_tokens=20, cache_read_tokens=7)
    log = request_log(
        request_id=request_id,
        user_id=user,
        key_mask="sk-ali…ice",
        model="claude-sonnet-4-5",
        usage=usage,
        cost=D(cost),
        billing_tokens=130,
        pool=pool,
        status_code=200,
        latency_ms=850,
        ttft_ms=120,
        host="chat.example",
        upstream="api.anthropic.com",
        path="/v1/messages",
        stream=True,
        created_at=created_at,
    )
    return Settlement(
        request_id=request_id,
        user_id=user,
        pool=pool,
        cost=D(cost),
        billing_tokens=130,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        key_doc_id=key,
        log=log,
    )


def alice(store: Store, **balances: str) -> None:
    store.create_user("alice", "sk-alice", {k: D(v) for k, v in balances.items()})


# -- keys and users -------------------------------------------------------------------


def test_find_key_lookup_order(store: Store) -> None:
    alice(store, creditsNew="5")
    store.create_user("bob", hash_key("sk-burn-bob"), {})
    store.import_user({"_id": "carol", "isActive": True, "apiKey": "sk-trollllm-carol"})
    store.import_user({"_id": "dave", "apiKey": "sk-alice"})

    raw = store.find_key("sk-alice")
    assert raw is not None
    assert (raw.user_id, raw.key_doc_id, raw.key_active) == ("alice", "sk-alice", True)
    assert raw.user["creditsNew"] == D(5)  # user_keys wins over dave's usersNew.apiKey

    hashed = store.find_key("sk-burn-bob")
    assert hashed is not None
    assert (hashed.user_id, hashed.key_doc_id) == ("bob", hash_key("sk-burn-bob"))

    legacy = store.find_key("sk-trollllm-carol")
    assert legacy is not None
    assert (legacy.user_id, legacy.key_doc_id, legacy.key_expires_at) == ("carol", None, None)

    assert store.find_key("sk-unknown") is None
    assert store.find_key(hash_key("sk-burn-bob")) is None  # what the store holds is no key


def test_find_key_inactive_expired_and_orphaned(store: Store) -> None:
    alice(store)
    expires = datetime(2025, 6, 1, tzinfo=UTC)
    put_key(store, {"_id": "sk-off", "name": "alice", "isActive": False, "expiresAt": expires})
    put_key(store, {"_id": "sk-orphan", "name": "nobody", "isActive": True})

    off = store.find_key("sk-off")
    assert off is not None
    assert off.key_active is False
    assert off.key_expires_at == expires
    assert store.find_key("sk-orphan") is None


def test_an_expired_key_document_gives_way_to_the_users_api_key(store: Store) -> None:
    """The original's payment keys expire with their package (and it then deleted them):
    the same key may still be the user's usersNew.apiKey, for the pools still valid."""
    store.import_user({"_id": "minh", "apiKey": "sk-paid", "credits": 5.0})
    store.import_user({"_id": "lan", "credits": 5.0})
    past = datetime.now(UTC) - timedelta(days=1)
    put_key(store, {"_id": "sk-paid", "name": "minh", "isActive": True, "expiresAt": past})
    put_key(store, {"_id": "sk-gone", "name": "lan", "isActive": True, "expiresAt": past})
    owner = store.find_key("sk-paid")
    assert owner is not None and owner.user_id == "minh"
    assert (owner.key_doc_id, owner.key_expires_at) == (None, None)
    expired = store.find_key("sk-gone")  # nothing else: the expired key, for admission to refuse
    assert expired is not None and expired.key_expires_at is not None
    assert expired.key_expires_at.timestamp() == pytest.approx(past.timestamp(), abs=0.001)


def test_create_user_and_users(store: Store) -> None:
    alice(store, creditsNew="12.5", credits="1")
    store.create_user("bob", "sk-bob", {})
    user = store.user("alice")
    assert user is not None
    assert user["isActive"] is True
    assert user["creditsNew"] == D("12.5") and isinstance(user["creditsNew"], D)
    assert user["createdAt"].tzinfo is not None
    assert "refCredits" not in user  # balances not given stay missing
    assert (user["creditsNewUsed"], user["tokensUserNew"], user["totalOutputTokens"]) == (0, 0, 0)
    assert [u["_id"] for u in store.users()] == ["alice", "bob"]
    assert store.user("nobody") is None
    with pytest.raises(ValueError):
        store.create_user("alice", "sk-other", {})


def test_topup_and_balance(store: Store) -> None:
    alice(store, credits="1")
    assert store.topup("alice", "refCredits", D("2.000000001")) == D("2.000000001")
    assert store.topup("alice", "credits", D("0.5")) == D("1.5")
    assert store.balance("alice", OHMYGPT) == D("3.500000001")
    assert store.balance("alice", OPENHANDS) == 0
    assert store.balance("nobody", OHMYGPT) == 0
    with pytest.raises(KeyError):
        store.topup("nobody", "credits", D(1))
    with pytest.raises(ValueError):
        store.topup("alice", "role", D(1))


def test_set_fields(store: Store) -> None:
    alice(store)
    expires = datetime(2025, 12, 31, 17, 0, tzinfo=UTC)
    store.set_fields("alice", {"isActive": False, "expiresAtNew": expires, "note": "vip"})
    user = store.user("alice")
    assert user is not None
    assert (user["isActive"], user["expiresAtNew"], user["note"]) == (False, expires, "vip")
    with pytest.raises(KeyError):
        store.set_fields("nobody", {"isActive": False})


# -- holds ----------------------------------------------------------------------------


def test_hold_full(store: Store) -> None:
    alice(store, creditsNew="10")
    hold = store.hold("r1", "alice", OPENHANDS, D(3), D(1))
    assert isinstance(hold, Hold)
    assert hold.parts == {"creditsNew": D(3)} and hold.pool == "openhands"
    assert store.balance("alice", OPENHANDS) == D(7)


def test_hold_partial_covers_minimum(store: Store) -> None:
    alice(store, creditsNew="2")
    hold = store.hold("r1", "alice", OPENHANDS, D(3), D("1.5"))
    assert isinstance(hold, Hold) and hold.amount == D(2)
    assert store.balance("alice", OPENHANDS) == 0


def test_hold_refused(store: Store) -> None:
    alice(store, creditsNew="0.5")
    assert store.hold("r1", "alice", OPENHANDS, D(3), D(1)) == InsufficientBalance(D("0.5"))
    assert store.balance("alice", OPENHANDS) == D("0.5")
    store.topup("alice", "creditsNew", D("-0.5"))
    assert store.hold("r2", "alice", OPENHANDS, D(3), D(0)) == InsufficientBalance(D(0))
    assert store.hold("r3", "nobody", OPENHANDS, D(3), D(0)) == InsufficientBalance(D(0))
    # an empty pool is refused even for a request that costs nothing (a free model)
    assert store.hold("r4", "alice", OPENHANDS, D(0), D(0)) == InsufficientBalance(D(0))
    store.create_user("bob", "sk-bob", {"credits": D(-3), "refCredits": D(0)})  # overdrawn
    assert store.hold("r5", "bob", OHMYGPT, D(0), D(0)) == InsufficientBalance(D(-3))
    assert store.open_holds(datetime.now(UTC) + timedelta(days=1)) == []


def test_hold_spends_fields_in_order(store: Store) -> None:
    alice(store, credits="1", refCredits="5")
    hold = store.hold("r1", "alice", OHMYGPT, D(3), D(1))
    assert isinstance(hold, Hold)
    assert hold.parts == {"credits": D(1), "refCredits": D(2)}
    user = store.user("alice")
    assert user is not None and (user["credits"], user["refCredits"]) == (0, D(3))


def test_hold_never_takes_a_field_below_zero(store: Store) -> None:
    store.import_user({"_id": "alice", "credits": -1.0, "refCredits": 5.0})
    hold = store.hold("r1", "alice", OHMYGPT, D(10), D(1))
    assert isinstance(hold, Hold)
    assert hold.parts == {"refCredits": D(4)}  # the pool's sum is 4
    user = store.user("alice")
    assert user is not None and (user["credits"], user["refCredits"]) == (D(-1), D(1))


def test_hold_many_in_turn(store: Store) -> None:
    """Each request sees the balance the ones before it left."""
    alice(store, creditsNew="5")
    store.create_user("bob", "sk-bob", {"credits": D(1)})
    outcomes = store.hold_many(
        [
            HoldRequest("r1", "alice", OPENHANDS, D(3), D(1)),
            HoldRequest("r2", "alice", OPENHANDS, D(3), D("2.5")),  # 2 left: refused
            HoldRequest("r3", "alice", OPENHANDS, D(3), D(1)),  # 2 left: held partly
            HoldRequest("r4", "bob", OHMYGPT, D("0.25"), D(0)),
        ]
    )
    assert isinstance(outcomes[0], Hold) and outcomes[0].amount == D(3)
    assert outcomes[1] == InsufficientBalance(D(2))
    assert isinstance(outcomes[2], Hold) and outcomes[2].amount == D(2)
    assert isinstance(outcomes[3], Hold) and outcomes[3].parts == {"credits": D("0.25")}
    assert store.balance("alice", OPENHANDS) == 0 and store.balance("bob", OHMYGPT) == D("0.75")
    held = store.open_holds(datetime.now(UTC) + timedelta(days=1))
    assert sorted(h.request_id for h in held) == ["r1", "r3", "r4"]


def test_try_hold_makes_the_hold_or_leaves_it_as_it_was(store: Store) -> None:
    """The hold ``hold`` would make, or None and nothing changed (SQLite tries, MongoDB
    never does)."""
    alice(store, creditsNew="5")
    outcomes = [
        store.try_hold(HoldRequest(f"r{i}", "alice", OPENHANDS, D(3), D(3))) for i in (1, 2)
    ]
    if outcomes == [None, None]:
        assert store.balance("alice", OPENHANDS) == D(5)
        assert store.open_holds(datetime.now(UTC) + timedelta(days=1)) == []
        return
    assert isinstance(outcomes[0], Hold) and outcomes[0].parts == {"creditsNew": D(3)}
    assert outcomes[1] == InsufficientBalance(D(2))
    assert store.balance("alice", OPENHANDS) == D(2)
    held = store.open_holds(datetime.now(UTC) + timedelta(days=1))
    assert [h.request_id for h in held] == ["r1"]


# -- settlement -----------------------------------------------------------------------


def test_settle_below_hold_releases_the_rest_and_counts(store: Store) -> None:
    alice(store, creditsNew="10")
    store.hold("r1", "alice", OPENHANDS, D(3), D(1))
    assert store.settle([settlement("r1", "1.25")]) == [True]
    user = store.user("alice")
    assert user is not None
    assert user["creditsNew"] == D("8.75")
    assert user["creditsNewUsed"] == D("1.25")
    assert (user["tokensUserNew"], user["totalInputTokens"], user["totalOutputTokens"]) == (
        130,
        100,
        20,
    )
    assert user["creditsUsed"] == 0
    assert store.open_holds(datetime.now(UTC) + timedelta(days=1)) == []


def test_settle_key_counters(store: Store) -> None:
    alice(store, creditsNew="10")
    store.settle([settlement("r1", "1"), settlement("r2", "1")])
    put_key(store, {"_id": "probe", "name": "alice"})  # unrelated key: untouched
    keys = key_doc(store, "sk-alice")
    assert (keys["tokensUsed"], keys["requestsCount"]) == (240, 2)
    assert keys["lastUsedAt"].tzinfo is not None
    assert "requestsCount" not in key_doc(store, "probe")


def test_settle_finds_a_raw_key_document_by_its_reference(store: Store) -> None:
    """Journaled settlements name a legacy raw-key document by its hash (``key_ref``)."""
    alice(store, creditsNew="10")
    store.settle([settlement("r1", "1", key=key_ref("sk-alice"))])
    assert key_doc(store, "sk-alice")["requestsCount"] == 1


def test_settle_above_hold_overdraws_by_the_difference(store: Store) -> None:
    alice(store, creditsNew="2")
    store.hold("r1", "alice", OPENHANDS, D(3), D(1))
    assert store.settle([settlement("r1", "2.5")]) == [True]
    assert store.balance("alice", OPENHANDS) == D("-0.5")


def test_settle_multi_field(store: Store) -> None:
    alice(store, credits="1", refCredits="5")
    store.hold("r1", "alice", OHMYGPT, D(3), D(1))  # 1 + 2
    store.settle([settlement("r1", "2", pool="ohmygpt")])
    user = store.user("alice")
    assert user is not None
    assert (user["credits"], user["refCredits"], user["creditsUsed"]) == (0, D(4), D(2))
    assert user["tokensUserNew"] == 0  # the ohmygpt pool counts no billing tokens

    store.hold("r2", "alice", OHMYGPT, D(1), D(1))  # all from refCredits
    store.topup("alice", "credits", D(1))
    store.settle([settlement("r2", "3", pool="ohmygpt")])  # excess 2: credits 1, then refCredits
    user = store.user("alice")
    assert user is not None
    assert (user["credits"], user["refCredits"], user["creditsUsed"]) == (0, D(2), D(5))


def test_settle_is_idempotent(store: Store) -> None:
    alice(store, creditsNew="10")
    store.hold("r1", "alice", OPENHANDS, D(3), D(1))
    s = settlement("r1", "1")
    assert store.settle([s]) == [True]
    before = store.user("alice")
    assert store.settle([s, s]) == [False, False]
    assert store.user("alice") == before
    assert len(store.logs(10)) == 1


def test_settle_without_hold(store: Store) -> None:
    alice(store, creditsNew="10")
    assert store.settle([settlement("r1", "1.5"), settlement("r2", "0")]) == [True, True]
    assert store.balance("alice", OPENHANDS) == D("8.5")
    user = store.user("alice")
    assert user is not None and user["creditsNewUsed"] == D("1.5")


def test_whole_float_counters_of_the_original_keep_counting(store: Store) -> None:
    """mongoexport writes a JavaScript number past 2^31 as 3000000000.0."""
    store.import_user({"_id": "alice", "creditsNew": 10.0, "totalInputTokens": 3000000000.0})
    store.import_log(
        {"_id": "old", "userId": "alice", "inputTokens": 7.0, "creditsCost": 0.5, "createdAt": T0}
    )
    assert store.settle([settlement("r1", "1")]) == [True]
    user = store.user("alice")
    assert user is not None and user["totalInputTokens"] == 3000000100
    assert store.balance("alice", OPENHANDS) == 9
    old = store.log("old")
    assert old is not None and old["inputTokens"] == 7


def test_settle_refused_request_logs_at_zero(store: Store) -> None:
    alice(store, creditsNew="0")
    assert isinstance(store.hold("r1", "alice", OPENHANDS, D(1), D(1)), InsufficientBalance)
    s = settlement("r1", "0", usage=UsageRecord(source="none"))
    assert store.settle([s]) == [True]
    log = store.log("r1")
    assert log is not None and log["creditsCost"] == 0 and log["usageSource"] == "none"
    assert store.balance("alice", OPENHANDS) == 0


# -- logs -----------------------------------------------------------------------------


def test_log_round_trip(store: Store) -> None:
    alice(store, creditsNew="10")
    s = settlement("r1", "0.020910001")
    store.settle([s])
    log = store.log("r1")
    assert log == s.log
    assert isinstance(log["creditsCost"], D) and log["creditsCost"] == D("0.020910001")
    assert log["createdAt"] == T0 and log["createdAt"].utcoffset() == timedelta(0)
    assert store.log("nope") is None


def test_billed_details_round_trip_and_recompute_the_usage(store: Store) -> None:
    alice(store, creditsNew="10")
    usage = UsageRecord(
        input_tokens=500,
        output_tokens=300,
        cache_read_tokens=40,
        cache_write_tokens=30,
        cache_write_1h_tokens=10,
        input_audio_tokens=200,
        input_image_tokens=100,
        cache_audio_read_tokens=20,
        output_audio_tokens=50,
        output_image_tokens=60,
        web_search_requests=3,
        code_executions=1,
        service_tier="priority",
    )
    s = settlement("r1", "0.5", usage=usage)
    store.settle([s])
    log = store.log("r1")
    assert log == s.log
    assert log is not None
    assert (log["webSearchRequests"], log["serviceTier"]) == (3, "priority")
    assert "cacheImageReadTokens" not in log  # zero: left out (docs/documents.md: optional classes)
    assert usage_of_log(log) == usage


def test_logs_between_a_window_oldest_first(store: Store) -> None:
    alice(store, creditsNew="10")
    store.settle([settlement(f"r{d}", "0", created_at=T0 + timedelta(days=d)) for d in range(4)])
    window = store.logs_between(T0 + timedelta(days=1), T0 + timedelta(days=3))
    assert [log["_id"] for log in window] == ["r1", "r2"]
    assert [log["_id"] for log in store.logs_between(None, T0 + timedelta(days=1))] == ["r0"]


def test_legacy_log_keeps_missing_fields(store: Store) -> None:
    oid = "65a1b2c3d4e5f60718293a4b"
    doc = {
        "_id": {"$oid": oid},
        "userId": "alice",
        "userKeyId": "sk-trollllm-0123",
        "trollKeyId": "openhands:k1",
        "model": None,
        "inputTokens": {"$numberLong": "1200"},
        "creditsCost": 0.0123,
        "isSuccess": True,
        "createdAt": {"$date": "2025-01-10T03:04:05.678Z"},
    }
    assert store.import_log(doc) == "added"
    assert store.import_log(doc) == "skipped"
    [log] = store.logs(5)
    assert log == {
        "_id": ObjectId(oid),
        "userId": "alice",
        "userKeyId": "sk-trollllm-0123",
        "trollKeyId": "openhands:k1",
        "model": None,
        "inputTokens": 1200,
        "creditsCost": D("0.0123"),
        "isSuccess": True,
        "createdAt": datetime(2025, 1, 10, 3, 4, 5, 678000, tzinfo=UTC),
    }
    assert "creditType" not in log


def test_logs_newest_first_limit_and_user(store: Store) -> None:
    alice(store, creditsNew="10")
    store.create_user("bob", "sk-bob", {"creditsNew": D(10)})
    store.settle(
        [
            settlement("a1", "1", created_at=T0),
            settlement("b1", "1", user="bob", key="sk-bob", created_at=T0 + timedelta(1)),
            settlement("a2", "1", created_at=T0 + timedelta(2)),
        ]
    )
    assert [log["_id"] for log in store.logs(10)] == ["a2", "b1", "a1"]
    assert [log["_id"] for log in store.logs(2)] == ["a2", "b1"]
    assert [log["_id"] for log in store.logs(10, "alice")] == ["a2", "a1"]


def test_purge_logs(store: Store) -> None:
    alice(store, creditsNew="10")
    store.settle([settlement(f"r{d}", "0", created_at=T0 + timedelta(days=d)) for d in range(4)])
    assert store.purge_logs(T0 + timedelta(days=2)) == 2
    assert [log["_id"] for log in store.logs(10)] == ["r3", "r2"]
    assert store.purge_logs(T0) == 0


# -- abandoned holds ------------------------------------------------------------------


def test_open_holds_and_release(store: Store) -> None:
    alice(store, credits="1", refCredits="5")
    hold = store.hold("r1", "alice", OHMYGPT, D(3), D(1))
    assert isinstance(hold, Hold)
    assert store.open_holds(hold.created_at) == []
    [found] = store.open_holds(hold.created_at + timedelta(seconds=1))
    assert found == hold
    assert store.release(found) is True
    assert store.release(found) is False
    user = store.user("alice")
    assert user is not None and (user["credits"], user["refCredits"]) == (D(1), D(5))
    assert store.open_holds(hold.created_at + timedelta(days=1)) == []
    # a late settlement after the sweep still charges, once
    assert store.settle([settlement("r1", "2", pool="ohmygpt")]) == [True]
    assert store.balance("alice", OHMYGPT) == D(4)


# -- import ---------------------------------------------------------------------------


def test_import_user(store: Store) -> None:
    doc = {
        "_id": "erin",
        "isActive": True,
        "role": "priority",
        "apiKey": "sk-trollllm-erin",
        "credits": 12.34,
        "creditsNew": {"$numberInt": "3"},
        "creditsNewUsed": 0.1,
        "tokensUserNew": {"$numberLong": "9007199254740993"},
        "expiresAtNew": {"$date": {"$numberLong": "1767225600000"}},
        "createdAt": {"$date": "2025-11-28T09:00:00+07:00"},
        "referredBy": None,
        "discordId": "1234",
    }
    assert store.import_user(doc) == "added"
    assert store.import_user({**doc, "credits": 99.0}) == "skipped"
    user = store.user("erin")
    assert user == {
        "_id": "erin",
        "isActive": True,
        "role": "priority",
        "apiKey": "sk-trollllm-erin",
        "credits": D("12.34"),
        "creditsNew": D(3),
        "creditsNewUsed": D("0.1"),
        "tokensUserNew": 9007199254740993,
        "expiresAtNew": datetime(2026, 1, 1, tzinfo=UTC),
        "createdAt": datetime(2025, 11, 28, 2, tzinfo=UTC),
        "referredBy": None,
        "discordId": "1234",
    }
    assert store.balance("erin", OHMYGPT) == D("12.34")
    with pytest.raises(ValueError):
        store.import_user({"credits": 1.0})
