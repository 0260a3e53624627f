"""The schema module is the one declaration: the docs, the SQLite tables and the documents the
proxy writes follow it."""

from __future__ import annotations

import re
import sqlite3
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import mongomock
import pytest

from burnmeter import schema
from burnmeter.config import default_config
from burnmeter.documents import request_log
from burnmeter.documents import usage_of_log
from burnmeter.records import UsageRecord
from burnmeter.store.mongo import MongoStore
from burnmeter.store.sqlite import SqliteStore

DOCS = Path(__file__).resolve().parents[1] / "docs" / "documents.md"
ROW = re.compile(r"^\| `(\w+)` \| (\w+) \| (original|burnmeter) \|", re.MULTILINE)


def documented(collection: str) -> list[tuple[str, str, str]]:
    """(field, type, origin) rows of the docs' table for ``collection``."""
    text = DOCS.read_text()
    start = text.index(f"collection `{collection}`")
    end = text.find("\n## ", start)
    return ROW.findall(text[start : end if end >= 0 else None])


@pytest.mark.parametrize("collection", schema.COLLECTIONS, ids=lambda c: c.name)
def test_the_docs_list_every_field_with_its_kind_and_origin(
    collection: schema.Collection,
) -> None:
    declared = [(f.name, f.kind, f.origin) for f in collection.fields]
    assert documented(collection.name) == declared


def test_the_sqlite_tables_have_a_column_per_field_of_its_kind(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "b.db", default_config().pools)
    store.ensure_schema(0)
    db = sqlite3.connect(tmp_path / "b.db")
    for collection in schema.COLLECTIONS:
        columns = {row[1]: row[2] for row in db.execute(f"PRAGMA table_info({collection.name})")}
        for name, kind in collection.columns().items():
            assert columns.get(name) == schema.SQLITE_TYPES[kind], (collection.name, name)
        not_columns = [f.name for f in collection.fields if not f.column and f.name != "_id"]
        assert not set(not_columns) & set(columns)
    store.close()


def a_log(usage: UsageRecord) -> dict[str, object]:
    return request_log(
        request_id="r1",
        user_id="alice",
        key_mask="sk-burn…ab12",
        model="gpt-4o",
        usage=usage,
        cost=Decimal("0.25"),
        billing_tokens=12,
        pool="openhands",
        status_code=200,
        latency_ms=5,
        ttft_ms=None,
        host="h",
        upstream="u",
        path="/v1/chat/completions",
        stream=False,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        route_multiplier=Decimal("1.5"),
    )


def test_the_request_log_has_the_declared_fields_and_its_usage_round_trips() -> None:
    usage = UsageRecord(
        input_tokens=100,
        output_tokens=50,
        cache_read_tokens=10,
        cache_write_tokens=5,
        cache_write_1h_tokens=2,
        reasoning_tokens=20,
        input_audio_tokens=3,
        web_search_requests=1,
        service_tier="priority",
    )
    log = a_log(usage)
    assert set(log) <= {f.name for f in schema.REQUEST_LOG.fields}
    assert usage_of_log(log) == usage
    plain = a_log(UsageRecord(input_tokens=1, output_tokens=1))
    optional = {f.name for f in schema.REQUEST_LOG.fields if f.optional}
    assert set(plain) & optional == {"routeMultiplier"}, "zero classes are left out"
    required = {f.name for f in schema.REQUEST_LOG.fields if not f.optional}
    assert required <= set(plain)


def test_mongodb_keeps_each_money_field_as_a_double() -> None:
    db = mongomock.MongoClient(tz_aware=True)["fproxy"]
    store = MongoStore(db, default_config().pools)
    store.ensure_schema(0)
    store.import_user({"_id": "u", **dict.fromkeys(schema.USER.named("money"), Decimal("1.5"))})
    store.import_log({"_id": "l", **dict.fromkeys(schema.REQUEST_LOG.named("money"), Decimal(2))})
    user = db[schema.USER.name].find_one({"_id": "u"})
    log = db[schema.REQUEST_LOG.name].find_one({"_id": "l"})
    assert user is not None and log is not None
    assert all(type(user[f]) is float for f in schema.USER.named("money"))
    assert all(type(log[f]) is float for f in schema.REQUEST_LOG.named("money"))
