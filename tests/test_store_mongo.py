"""MongoDB only (mongomock): indexes, the TTL, and field types as the original writes them
(docs/documents.md)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC
from datetime import datetime
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import mongomock
import pymongo
import pymongo.errors
import pytest
from stores import POOLS
from stores import unreachable_mongo_store

from burnmeter.exceptions import DocumentError
from burnmeter.exceptions import StoreError
from burnmeter.journal import Journal
from burnmeter.store.base import USERS
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import Settlement
from burnmeter.store.mongo import MongoStore
from burnmeter.writer import SettlementWriter


@pytest.fixture
def store() -> MongoStore:
    return MongoStore(mongomock.MongoClient(tz_aware=True)["fproxy"], POOLS)


def keys(store: MongoStore, collection: str) -> Mapping[str, dict[str, Any]]:
    return store.db[collection].index_information()


def test_indexes_and_ttl(store: MongoStore) -> None:
    store.db["usersNew"].create_index("apiKey", unique=True, sparse=True)  # mongoose's
    store.ensure_schema(30)
    store.ensure_schema(30)
    logs = keys(store, "request_logs")
    assert logs["creditType_1_createdAt_-1"]["key"] == [("creditType", 1), ("createdAt", -1)]
    assert logs["userId_1_createdAt_-1"]["key"] == [("userId", 1), ("createdAt", -1)]
    assert "expireAfterSeconds" not in logs["createdAt_-1"]
    assert logs["createdAt_1"]["expireAfterSeconds"] == 30 * 86400
    assert keys(store, "usersNew")["apiKey_1"]["unique"] is True

    store.ensure_schema(0)
    assert "createdAt_1" not in keys(store, "request_logs")


def test_changed_ttl_uses_collmod(store: MongoStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.ensure_schema(30)
    commands: list[dict[str, Any]] = []
    monkeypatch.setattr(store.db, "command", commands.append)
    store.ensure_schema(7)
    assert commands == [
        {"collMod": "request_logs", "index": {"name": "createdAt_1", "expireAfterSeconds": 604800}}
    ]


def test_from_url_names_the_database() -> None:
    store = MongoStore.from_url("mongodb://127.0.0.1:1/billing", POOLS)
    assert store.db.name == "billing"
    store.close()
    assert MongoStore.from_url("mongodb://127.0.0.1:1", POOLS).db.name == "fproxy"


def test_field_types_as_the_original_writes_them(store: MongoStore) -> None:
    store.create_user("alice", "sk-alice", {"creditsNew": D(10)})
    hold = store.hold("r1", "alice", POOLS["openhands"], D(3), D(1))
    assert isinstance(hold, Hold)
    raw = store.db["usersNew"].find_one({"_id": "alice"})
    assert raw is not None
    assert raw["burnmeterHolds"]["r1"]["parts"] == {"creditsNew": 3.0}
    assert "burnmeterHolds" not in (store.user("alice") or {})

    log = {"creditsCost": D("0.02091"), "inputTokens": 100, "createdAt": hold.created_at}
    store.settle(
        [Settlement("r1", "alice", "openhands", D("0.02091"), 5, 100, 20, "sk-alice", log)]
    )
    raw = store.db["usersNew"].find_one({"_id": "alice"})
    assert raw is not None
    assert type(raw["creditsNew"]) is float and raw["creditsNew"] == 10 - 0.02091
    assert type(raw["creditsNewUsed"]) is float
    assert type(raw["tokensUserNew"]) is int and type(raw["createdAt"]) is datetime
    assert raw["burnmeterHolds"] == {} and raw.get("burnmeterSettled") == {}
    raw_log = store.db["request_logs"].find_one({"_id": "r1"})
    assert raw_log is not None
    assert type(raw_log["creditsCost"]) is float and type(raw_log["inputTokens"]) is int
    raw_key = store.db["user_keys"].find_one({"_id": "sk-alice"})
    assert raw_key is not None and (raw_key["tokensUsed"], raw_key["requestsCount"]) == (120, 1)


def test_retry_after_charge_before_log_charges_once(store: MongoStore) -> None:
    store.create_user("alice", "sk-alice", {"creditsNew": D(10)})
    store.hold("r1", "alice", POOLS["openhands"], D(3), D(1))
    s = Settlement("r1", "alice", "openhands", D(2), 0, 0, 0, None, {"creditsCost": D(2)})
    assert store._charge(s) is True  # then the process failed before the log insert
    assert store.settle([s]) == [True]
    assert store.balance("alice", POOLS["openhands"]) == D(8)
    raw = store.db["usersNew"].find_one({"_id": "alice"})
    assert raw is not None and raw["burnmeterSettled"] == {}


def test_hold_filter_rechecks_the_balance(
    store: MongoStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A balance spent between the read and the update makes the update miss, then re-read."""
    store.create_user("alice", "sk-alice", {"creditsNew": D(3)})
    users = store.db["usersNew"]
    real_update = users.update_one
    calls: list[dict[str, Any]] = []

    def racing_update(query: dict[str, Any], update: dict[str, Any]) -> Any:
        if not calls:
            real_update({"_id": "alice"}, {"$inc": {"creditsNew": -2.5}})  # a rival request
        calls.append(query)
        return real_update(query, update)

    monkeypatch.setattr(users, "update_one", racing_update)  # mongomock caches collections
    result = store.hold("r1", "alice", POOLS["openhands"], D(3), D("0.1"))
    assert isinstance(result, Hold) and result.amount == D("0.5")
    assert len(calls) == 2
    assert store.balance("alice", POOLS["openhands"]) == 0


def test_an_unreachable_server_is_an_outage_on_every_call_the_proxy_makes() -> None:
    """A real pymongo client, nothing listening: each call is a StoreError (the proxy's cue
    to serve cached keys hold-less and keep settlements in the journal), never a crash."""
    store = unreachable_mongo_store()
    openhands = POOLS["openhands"]
    try:
        with pytest.raises(StoreError, match="MongoDB"):
            store.find_key("sk-anything")
        [outcome] = store.hold_many([HoldRequest("r1", "alice", openhands, D(1), D(1))])
        assert isinstance(outcome, StoreError)
        settlement = Settlement("r1", "alice", "openhands", D(1), 1, 1, 0, None, {})
        with pytest.raises(StoreError):
            store.settle([settlement])
        with pytest.raises(StoreError):
            store.open_holds(datetime.now(UTC))
        with pytest.raises(StoreError):
            store.ensure_schema(30)
    finally:
        store.close()


def refusing_inc_on_non_numbers(store: MongoStore) -> None:
    """Make mongomock answer as MongoDB does to $inc on a null or string field."""
    users = store.db[USERS]
    update_one = users.update_one

    def server_like(query: Any, update: Any, *args: Any, **kwargs: Any) -> Any:
        doc = users.find_one(query) or {}
        for name in update.get("$inc", {}):
            if name in doc and not isinstance(doc[name], int | float):
                raise pymongo.errors.WriteError(
                    f"Cannot apply $inc to a value of non-numeric type {doc[name]!r}", 14
                )
        return update_one(query, update, *args, **kwargs)

    users.update_one = server_like  # type: ignore[method-assign]


def test_a_legacy_document_the_server_refuses_is_set_aside_not_an_outage(
    store: MongoStore, tmp_path: Path
) -> None:
    """One user with creditsUsed: null must not stop everyone's settlements (as an outage
    would: retried forever, the store marked down)."""
    store.db[USERS].insert_many(
        [{"_id": "legacy", "credits": 5.0, "creditsUsed": None}, {"_id": "bob", "credits": 5.0}]
    )
    refusing_inc_on_non_numbers(store)
    with pytest.raises(DocumentError):
        store.settle([Settlement("r1", "legacy", "ohmygpt", D("0.5"), 0, 1, 1, None, {})])
    journal = Journal(str(tmp_path / "settlements.journal"))
    writer = SettlementWriter(lambda: store, journal, backoff=(0.01, 0.05))
    writer.start()
    writer.submit(Settlement("r2", "legacy", "ohmygpt", D("0.5"), 0, 1, 1, None, {}))
    writer.submit(Settlement("r3", "bob", "ohmygpt", D("0.5"), 0, 1, 1, None, {}))
    assert writer.stop(5) == 0 and writer.healthy
    journal.close()
    assert store.balance("bob", POOLS["ohmygpt"]) == D("4.5")
    assert "r2" in (tmp_path / "settlements.journal.rejected").read_text()


def test_a_balance_that_is_no_number_is_refused_at_once(store: MongoStore) -> None:
    store.db[USERS].insert_one({"_id": "legacy", "credits": "5", "creditsUsed": 0})
    [outcome] = store.hold_many([HoldRequest("r1", "legacy", POOLS["ohmygpt"], D(3), D(1))])
    assert isinstance(outcome, DocumentError) and "credits is not a number" in str(outcome)
