"""What the store tests share besides the ``store`` fixture (see conftest.py)."""

from __future__ import annotations

import socket
from typing import Any

import pymongo

from burnmeter.config import default_config
from burnmeter.store.base import KEYS
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from burnmeter.store.mongo import MongoStore
from burnmeter.store.mongo import _to_bson
from burnmeter.store.sqlite import KEY_COLUMN_KINDS
from burnmeter.store.sqlite import SqliteStore
from burnmeter.store.sqlite import _row

POOLS = default_config().pools


def put_key(store: Store, doc: Document) -> None:
    """Write a user_keys document as an existing deployment would have it."""
    if isinstance(store, SqliteStore):
        with store._write() as conn:
            store._insert(conn, KEYS, _row(doc, KEY_COLUMN_KINDS))
    else:
        assert isinstance(store, MongoStore)
        store.db[KEYS].insert_one(_to_bson(doc, ()))


def key_doc(store: Store, key_id: str) -> dict[str, Any]:
    """A user_keys document as stored (the interface has no reader for them)."""
    doc: Document | None
    if isinstance(store, SqliteStore):
        doc = store._one(KEYS, KEY_COLUMN_KINDS, "_id", key_id)
    else:
        assert isinstance(store, MongoStore)
        doc = store._one(KEYS, {"_id": key_id}, ())
    assert doc is not None
    return doc


def unreachable_mongo_store() -> MongoStore:
    """A MongoStore on a real pymongo client with nothing listening (100 ms to give up)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client tries it
    client: pymongo.MongoClient[Any] = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/fproxy", tz_aware=True, serverSelectionTimeoutMS=100
    )
    return MongoStore(client["fproxy"], POOLS, client)
