"""The ``store`` fixture: every contract test runs against each backend."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import mongomock
import pymongo
import pytest
from stores import POOLS

from burnmeter.store.base import Document
from burnmeter.store.base import Store
from burnmeter.store.mongo import MongoStore
from burnmeter.store.sqlite import SqliteStore

MONGO_URI_ENV = "BURNMETER_TEST_MONGO_URI"


@pytest.fixture(
    params=["sqlite", "mongo", pytest.param("mongo_live", marks=pytest.mark.mongo_live)]
)
def store(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> Iterator[Store]:
    s: Store
    client: pymongo.MongoClient[Document] | None = None
    match request.param:
        case "sqlite":
            s = SqliteStore(os.path.join(tmp_path, "burnmeter.db"), POOLS)
        case "mongo":
            s = MongoStore(mongomock.MongoClient(tz_aware=True)["fproxy"], POOLS)
        case _:
            uri = os.environ.get(MONGO_URI_ENV)
            if not uri:
                pytest.skip(f"set {MONGO_URI_ENV} to run against a real MongoDB")
            client = pymongo.MongoClient(uri, tz_aware=True, serverSelectionTimeoutMS=3000)
            s = MongoStore(client[f"burnmeter_test_{uuid.uuid4().hex[:12]}"], POOLS)
    s.ensure_schema(0)
    yield s
    s.close()
    if client is not None:
        assert isinstance(s, MongoStore)
        client.drop_database(s.db.name)
        client.close()
