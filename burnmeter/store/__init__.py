"""Open the store a URL names: ``sqlite:///path`` (default) or ``mongodb://host/db``."""

from __future__ import annotations

import os
from collections.abc import Mapping

from burnmeter.config import DEFAULT_DB_URL
from burnmeter.config import Pool
from burnmeter.store.base import Store

ENV_DB = "BURNMETER_DB"


class StoreURLError(ValueError):
    pass


def resolve_url(explicit: str | None, config_db: str | None = None) -> str:
    """--db / metering_db, then $BURNMETER_DB, then the config's ``db``, then the default."""
    return explicit or os.environ.get(ENV_DB) or config_db or DEFAULT_DB_URL


def open_store(url: str, pools: Mapping[str, Pool], read_only: bool = False) -> Store:
    """``read_only``: SQLite opens the file with ``mode=ro`` (it must exist); nothing changes
    for MongoDB, whose readers simply never write."""
    if url.startswith("sqlite://"):
        from burnmeter.store.sqlite import SqliteStore

        path = url.removeprefix("sqlite://")
        if path.startswith("/"):
            path = path[1:]  # sqlite:///rel.db -> rel.db ; sqlite:////abs.db -> /abs.db
        if not path:
            raise StoreURLError(f"{url}: no file path (sqlite:///burnmeter.db)")
        return SqliteStore(path, pools, read_only)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from burnmeter.store.mongo import MongoStore

        return MongoStore.from_url(url, pools)
    raise StoreURLError(f"{url}: unsupported store URL (sqlite:///FILE or mongodb://HOST/DB)")
