"""The ``burnmeter`` CLI against each real store: SQLite through ``--db``, MongoDB
(mongomock) put where ``stats.context`` opens its store. Import ``backend_fixture`` to use
the ``backend`` fixture."""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import mongomock
import pytest
from click.testing import CliRunner
from click.testing import Result

import stats.context
from burnmeter.config import default_config
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from burnmeter.store.mongo import MongoStore
from burnmeter.store.sqlite import SqliteStore
from stats.cli import cli


@dataclass
class Backend:
    name: str
    options: list[str]  # the CLI's global options
    connect: Callable[[], Store]
    raw_bytes: Callable[[], bytes]  # everything the store holds, for searching
    _stores: list[Store] = field(default_factory=list)

    def run(self, *args: str, input: bytes | str | None = None) -> Result:
        return CliRunner().invoke(cli, [*self.options, *args], input=input)

    def store(self) -> Store:
        """A store over the same data as the CLI's, opened after the CLI wrote it."""
        store = self.connect()
        self._stores.append(store)
        return store

    def user(self, user_id: str) -> Document:
        """The stored user document, which must exist."""
        doc = self.store().user(user_id)
        assert doc is not None, f"no user {user_id!r}"
        return doc

    def close(self) -> None:
        for store in self._stores:
            store.close()


@pytest.fixture(name="backend", params=["sqlite", "mongo"])
def backend_fixture(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    pools = default_config().pools
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    config = tmp_path / "default.toml"  # the built-in pools, named: no config notice
    config.write_text("")
    options = ["--config", str(config)]
    if request.param == "sqlite":
        path = tmp_path / "burnmeter.db"

        def sqlite_bytes() -> bytes:  # the WAL file holds what is not checkpointed yet
            return b"".join(p.read_bytes() for p in tmp_path.glob("burnmeter.db*"))

        b = Backend(
            "sqlite",
            [*options, "--db", f"sqlite:///{path}"],
            lambda: SqliteStore(path, pools),
            sqlite_bytes,
        )
    else:
        database: Any = mongomock.MongoClient(tz_aware=True)["fproxy"]
        monkeypatch.setattr(
            stats.context, "open_store", lambda url, pools, **_: MongoStore(database, pools)
        )

        def mongo_bytes() -> bytes:
            docs = [list(database[name].find()) for name in database.list_collection_names()]
            return json.dumps(docs, default=str).encode()

        b = Backend("mongo", options, lambda: MongoStore(database, pools), mongo_bytes)
    yield b
    b.close()
