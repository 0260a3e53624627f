"""Open the store a URL names: ``sqlite:///path`` (default) or ``mongodb://host/db``."""

from __future__ import annotations

import os
from collections.abc import Mapping

from burnmeter.config import DEFAULT_DB_URL
from burnmeter.config import Pool
from burnmeter.exceptions import StoreMissing
from burnmeter.exceptions import StoreURLError
from burnmeter.store.base import Store

ENV_DB = "BURNMETER_DB"

__all__ = ["ENV_DB", "StoreMissing", "StoreURLError", "open_store", "resolve_url", "sqlite_path"]


def resolve_url(explicit: str | None, config_db: str | None = None) -> str:
    """--db / metering_db, then $BURNMETER_DB, then the config's ``db``, then the default."""
    return explicit or os.environ.get(ENV_DB) or config_db or DEFAULT_DB_URL


def sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite://`` URL (``sqlite:///rel.db``, ``sqlite:////abs.db``), else None."""
    if not url.startswith("sqlite://"):
        return None
    path = url.removeprefix("sqlite://")
    path = path[1:] if path.startswith("/") else path
    if not path:
        raise StoreURLError(f"{url}: no file path (sqlite:///burnmeter.db)")
    return path


def open_store(
    url: str,
    pools: Mapping[str, Pool],
    *,
    read_only: bool = False,
    create: bool = True,
    durable: bool = False,
) -> Store:
    """The store at ``url``.

    ``read_only``: the store must exist (else ``StoreMissing``), and nothing is written to
    it, not even an index (a read-only SQLite file works). ``create=False``: a writable store
    that must exist. ``durable``: a SQLite commit survives a power cut (synchronous=FULL);
    a MongoDB store's durability is its URL's write concern (``w=majority&journal=true``).
    The caller runs ``ensure_schema`` on a store it writes to."""
    path = sqlite_path(url)
    if path is not None:
        from burnmeter.store.sqlite import SqliteStore

        if not (create and not read_only) and not os.path.exists(path):
            raise StoreMissing(
                f"{path}: no such store (`burnmeter accounts create` or `import` makes one)"
            )
        return SqliteStore(path, pools, read_only=read_only, durable=durable)
    if url.startswith(("mongodb://", "mongodb+srv://")):
        from burnmeter.store.mongo import MongoStore

        store = MongoStore.from_url(url, pools)
        if not (create and not read_only):
            try:
                store.check_exists()
            except BaseException:
                store.close()
                raise
        return store
    raise StoreURLError(f"{url}: unsupported store URL (sqlite:///FILE or mongodb://HOST/DB)")
