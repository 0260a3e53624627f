"""The embedded store: one SQLite file in WAL mode, shared by the proxy and the CLI.

Tables mirror the MongoDB collections, with the documents' field names as column names and
types from their kinds (``burnmeter/schema.py``, ``docs/formats.md``): money is INTEGER
nano-USD, dates are INTEGER epoch milliseconds UTC, booleans 0/1, and NULL means the field is
missing. A field without a column, or whose value does not fit
its column's type (a null, say), is kept as Extended JSON in ``extra``.

Every write runs in ``BEGIN IMMEDIATE``: SQLite's single write lock makes each
read-then-write atomic across threads and processes. Each thread has its own connection.
A store opened ``read_only`` connects with ``mode=ro``: it works on a file the process may
not write, and SQLite itself refuses any write through it.

``try_hold`` makes a hold on the caller's thread (the proxy's event loop) only if nothing
can make it wait: on a connection of its own that never waits for the write lock
(``busy_timeout`` 0: a lock another connection or process holds is ``None``, the hold
thread's turn), never checkpoints (``wal_autocheckpoint`` 0: the other connections' commits
still do, the writer's settlements among them) and never syncs (WAL with
``synchronous=NORMAL`` writes the commit to the WAL file without fsync; a ``durable`` store
syncs every commit, so it never tries).


The file is the one that was opened, never another: SQLite writes on through an open
connection to a file that was deleted (lost with it) and creates an empty one for a new
connection, and a file replaced under a running proxy does not have its users. So the
file's identity (device and inode) is checked before every write transaction and every
new connection; a file that vanished or changed is a ``StoreError`` (an outage: the
settlements wait in the journal) until the same file is back.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from burnmeter import schema
from burnmeter.config import Pool
from burnmeter.documents import utcnow
from burnmeter.exceptions import StoreError
from burnmeter.exceptions import UserExists
from burnmeter.money import ZERO
from burnmeter.money import from_nanos
from burnmeter.money import is_number
from burnmeter.money import to_nanos
from burnmeter.schema import SQLITE_TYPES
from burnmeter.schema import Kind
from burnmeter.store import extjson
from burnmeter.store import rules
from burnmeter.store.base import KEYS
from burnmeter.store.base import LOGS
from burnmeter.store.base import USERS
from burnmeter.store.base import Document
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldOutcome
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import ImportOutcome
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from burnmeter.store.base import committed

logger = logging.getLogger(__name__)

Columns = Mapping[str, Kind]

USER_COLUMN_KINDS = schema.USER.columns()
KEY_COLUMN_KINDS = schema.KEY.columns()
LOG_COLUMN_KINDS = schema.REQUEST_LOG.columns()
HOLDS = "holds"

# The log indexes lead with the keys of docs/documents.md and carry the columns the stats reports sum,
# so that a report over a window reads the index alone.
INDEXES = (
    f"CREATE INDEX IF NOT EXISTS {USERS}_apiKey ON {USERS}(apiKey)",
    f"CREATE INDEX IF NOT EXISTS {LOGS}_createdAt ON {LOGS}(createdAt DESC, creditType,"
    " creditsCost, inputTokens, outputTokens, isSuccess, latencyMs, userId)",
    f"CREATE INDEX IF NOT EXISTS {LOGS}_creditType_createdAt"
    f" ON {LOGS}(creditType, createdAt DESC, creditsCost)",
    f"CREATE INDEX IF NOT EXISTS {LOGS}_userId_createdAt ON {LOGS}(userId, createdAt DESC)",
    f"CREATE INDEX IF NOT EXISTS {HOLDS}_createdAt ON {HOLDS}(createdAt)",
)
PURGE_CHUNK = 10_000
_LOST_FILES: set[str] = set()
"""Paths whose file was found deleted or replaced (and said so at ERROR)."""


def _cell(kind: Kind, value: Any) -> Any:
    """The column value for a field, or None when the value does not fit the column."""
    match kind:
        case "money" if is_number(value):
            return to_nanos(value)
        case "int" if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        case "int" if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            # the original's counters are JavaScript numbers (docs/documents.md): mongoexport may write 3000000000.0;
            # kept aside, it would hide the column that settlements count up and reports sum
            return int(value)
        case "date" if isinstance(value, datetime):
            return extjson.to_ms(value)
        case "bool" if isinstance(value, bool):
            return int(value)
        case "text" if isinstance(value, str):
            return value
    return None


def _value(kind: Kind, cell: Any) -> Any:
    match kind:
        case "money":
            return from_nanos(cell)
        case "date":
            return extjson.from_ms(cell)
        case "bool":
            return bool(cell)
    return cell


def _row(doc: Document, columns: Columns) -> dict[str, Any]:
    row: dict[str, Any] = {}
    extra: Document = {}
    for name, value in doc.items():
        if name == "_id":
            row["_id"] = value if isinstance(value, str) else str(value)
            if not isinstance(value, str):
                extra["_id"] = value  # an imported ObjectId: comes back as one
            continue
        cell = _cell(columns[name], value) if name in columns else None
        if cell is None:
            extra[name] = value
        else:
            row[name] = cell
    row["extra"] = extjson.dumps(extra) if extra else None
    return row


def _document(row: sqlite3.Row, columns: Columns) -> Document:
    doc: Document = {"_id": row["_id"]}
    for name, kind in columns.items():
        if row[name] is not None:
            doc[name] = _value(kind, row[name])
    if row["extra"]:
        doc.update(extjson.loads(row["extra"]))
    return doc


def _dump_parts(parts: Mapping[str, Decimal]) -> str:
    return json.dumps({name: to_nanos(part) for name, part in parts.items()})


def _load_parts(text: str) -> dict[str, Decimal]:
    return {name: from_nanos(nanos) for name, nanos in json.loads(text).items()}


def _busy(error: sqlite3.Error) -> bool:
    """SQLITE_BUSY and its extended codes: another connection holds a lock."""
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


def _names(columns: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in columns)


class SqliteStore(Store):
    def __init__(
        self,
        path: str | os.PathLike[str],
        pools: Mapping[str, Pool],
        *,
        read_only: bool = False,
        durable: bool = False,
    ) -> None:
        """``read_only``: opened with ``mode=ro`` (the file must exist; a read-only file
        works), and a pool column the file lacks reads as a missing field. ``durable``: each
        commit is synced (synchronous=FULL), so it survives a power cut; WAL's NORMAL keeps
        the file consistent but may lose the last commits."""
        super().__init__(pools)
        self.path = os.fspath(path)
        self.read_only = read_only
        self.durable = durable
        pool_columns: dict[str, Kind] = {}
        for pool in self.pools.values():
            pool_columns |= dict.fromkeys([*pool.balance, pool.used], "money")
            if pool.tokens:
                pool_columns[pool.tokens] = "int"
            if pool.expires:
                pool_columns[pool.expires] = "date"
        self.user_columns: dict[str, Kind] = pool_columns | USER_COLUMN_KINDS
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._unwaiting: sqlite3.Connection | None = None
        """``try_hold``'s connection, opened on its first use."""
        self._unwaiting_lock = threading.Lock()
        """Taken without waiting: a second thread trying meanwhile gets ``None``."""
        self._identity: tuple[int, int] | None = self._file_identity()
        """(st_dev, st_ino) of the file opened; None until it exists."""

    # -- connections --------------------------------------------------------------------
    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def check_identity(self) -> None:
        """``StoreError`` unless the file at ``path`` is still the one this store opened."""
        if self._identity is None:
            return
        if self._file_identity() == self._identity:
            if self.path in _LOST_FILES:
                _LOST_FILES.discard(self.path)
                logger.warning("%s: the store's file is back", self.path)
            return
        if self.path not in _LOST_FILES:  # one line, however many stores use the file
            _LOST_FILES.add(self.path)
            logger.error(
                "%s: the store's file was deleted or replaced: not writing to it"
                " (settlements wait in the journal until the same file is back)",
                self.path,
            )
        raise StoreError(f"{self.path}: the store's file was deleted or replaced")

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            self.check_identity()  # connecting would create an empty file
            try:
                conn = self._connect()
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from e
            if self._identity is None:
                self._identity = self._file_identity()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            uri = f"{Path(self.path).absolute().as_uri()}?mode=ro"
            conn = sqlite3.connect(
                uri, uri=True, timeout=10, isolation_level=None, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(
                self.path, timeout=10, isolation_level=None, check_same_thread=False
            )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=10000")
        if self.read_only:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if not {USERS, LOGS} <= tables:
                conn.close()
                raise StoreError(f"{self.path}: not a burnmeter store (no {USERS} table)")
            present = {row["name"] for row in conn.execute(f"PRAGMA table_info({USERS})")}
            self.user_columns = {n: k for n, k in self.user_columns.items() if n in present}
        else:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
        return conn

    def _read(
        self, sql: str, params: Iterable[Any] = (), conn: sqlite3.Connection | None = None
    ) -> list[sqlite3.Row]:
        try:
            return (conn or self.connection()).execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as e:
            raise StoreError(f"{self.path}: {e}") from e

    def _unwaiting_connection(self) -> sqlite3.Connection | None:
        """``try_hold``'s connection; None while the file is not yet known or not in WAL
        mode (outside WAL a writer blocks readers, and a commit syncs)."""
        if self._unwaiting is None and self._identity is not None:
            self.check_identity()  # connecting to a vanished file would create an empty one
            conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            try:
                conn.execute("PRAGMA wal_autocheckpoint=0")
                conn.execute("PRAGMA synchronous=NORMAL")
                wal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
            except sqlite3.Error:  # a lock (None) or a failure (StoreError): try_hold says
                conn.close()
                raise
            if not wal:
                conn.close()
                return None
            self._unwaiting = conn
            with self._lock:
                self._connections.append(conn)
        return self._unwaiting

    @contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        conn = conn or self.connection()
        self.check_identity()  # one stat per transaction: a batch of holds or settlements
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:  # the body or the commit failed
                    conn.execute("ROLLBACK")
        except sqlite3.OperationalError as e:
            raise StoreError(f"{self.path}: {e}") from e

    def probe_write(self, timeout: float) -> None:
        """Takes SQLite's write lock (``BEGIN IMMEDIATE``) on a connection of its own and
        rolls back: a file another connection holds write-locked is not writable now."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=rw"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from e
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {e}") from e
        finally:
            conn.close()

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            self._unwaiting = None
        self._local = threading.local()

    # -- set-up -------------------------------------------------------------------------
    def ensure_schema(self, log_ttl_days: int | None) -> None:
        """Tables and indexes. SQLite has no TTL: the proxy's writer purges old logs."""
        with self._write() as conn:
            for table, created, columns in (
                (USERS, USER_COLUMN_KINDS, self.user_columns),  # pool columns come after extra
                (KEYS, KEY_COLUMN_KINDS, KEY_COLUMN_KINDS),
                (LOGS, LOG_COLUMN_KINDS, LOG_COLUMN_KINDS),
            ):
                defs = ", ".join(f'"{name}" {SQLITE_TYPES[kind]}' for name, kind in created.items())
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table}(_id TEXT PRIMARY KEY, {defs}, extra TEXT)"
                )
                # the migration: a store written before a field existed gets its column (its
                # rows read NULL: missing)
                existing = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns.items():
                    if name not in existing:
                        conn.execute(
                            f'ALTER TABLE {table} ADD COLUMN "{name}" {SQLITE_TYPES[kind]}'
                        )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {HOLDS}(_id TEXT PRIMARY KEY, userId TEXT,"
                " pool TEXT, parts TEXT, createdAt INTEGER)"
            )
            for sql in INDEXES:
                conn.execute(sql)

    # -- documents ----------------------------------------------------------------------
    def _find(
        self,
        table: str,
        columns: Columns,
        where: str = "",
        params: Iterable[Any] = (),
        tail: str = "",
    ) -> list[Document]:
        if table == LOGS:  # a store not yet given the newer log columns reads them as absent
            present = {row["name"] for row in self._read(f"PRAGMA table_info({LOGS})")}
            columns = {name: kind for name, kind in columns.items() if name in present}
        sql = f"SELECT _id, {_names(columns)}, extra FROM {table} {where} {tail}"
        return [_document(row, columns) for row in self._read(sql, params)]

    def _one(self, table: str, columns: Columns, column: str, value: str) -> Document | None:
        docs = self._find(table, columns, f'WHERE "{column}" = ?', (value,), "LIMIT 1")
        return docs[0] if docs else None

    @staticmethod
    def _insert(conn: sqlite3.Connection, table: str, row: Mapping[str, Any]) -> bool:
        marks = ", ".join("?" * len(row))
        sql = f"INSERT OR IGNORE INTO {table} ({_names(row)}) VALUES ({marks})"
        return conn.execute(sql, tuple(row.values())).rowcount == 1

    @staticmethod
    def _add(conn: sqlite3.Connection, user_id: str, amounts: Mapping[str, Any]) -> None:
        """Increment user fields (NULL counts as 0): Decimals in USD, ints as they are."""
        if not amounts:
            return
        sets = ", ".join(f'"{name}" = COALESCE("{name}", 0) + ?' for name in amounts)
        values = [to_nanos(v) if isinstance(v, Decimal) else v for v in amounts.values()]
        conn.execute(f"UPDATE {USERS} SET {sets} WHERE _id = ?", (*values, user_id))

    def _balances(
        self, user_id: str, pool: Pool, conn: sqlite3.Connection | None = None
    ) -> dict[str, Decimal] | None:
        """The pool's balance fields in spending order; None for an unknown user."""
        rows = self._read(
            f"SELECT {_names(pool.balance)} FROM {USERS} WHERE _id = ?", (user_id,), conn
        )
        return {name: from_nanos(rows[0][name]) for name in pool.balance} if rows else None

    # -- keys and users -----------------------------------------------------------------
    def find_key(self, key: str) -> KeyOwner | None:
        return rules.find_key(
            key,
            key_doc=lambda key_id: self._one(KEYS, KEY_COLUMN_KINDS, "_id", key_id),
            user=self.user,
            user_by_api_key=lambda k: self._one(USERS, self.user_columns, "apiKey", k),
        )

    def user(self, user_id: str) -> Document | None:
        return self._one(USERS, self.user_columns, "_id", user_id)

    def users(self) -> list[Document]:
        return self._find(USERS, self.user_columns, tail="ORDER BY _id")

    def balance(self, user_id: str, pool: Pool) -> Decimal:
        return sum((self._balances(user_id, pool) or {}).values(), ZERO)

    def create_user(self, user_id: str, key_doc_id: str, balances: Mapping[str, Decimal]) -> None:
        user, key = rules.new_user_documents(
            user_id, key_doc_id, balances, self.pools.values(), utcnow()
        )
        with self._write() as conn:
            if not self._insert(conn, USERS, _row(user, self.user_columns)):
                raise UserExists(f"user {user_id!r} exists")
            if not self._insert(conn, KEYS, _row(key, KEY_COLUMN_KINDS)):
                raise UserExists(f"key {key_doc_id!r} exists")

    def topup(self, user_id: str, field_name: str, amount: Decimal) -> Decimal:
        if self.user_columns.get(field_name) != "money":
            raise ValueError(f"{field_name!r} is not a money field")
        with self._write() as conn:
            row = conn.execute(
                f'UPDATE {USERS} SET "{field_name}" = COALESCE("{field_name}", 0) + ?'
                f' WHERE _id = ? RETURNING "{field_name}"',
                (to_nanos(amount), user_id),
            ).fetchone()
        if row is None:
            raise KeyError(user_id)
        return from_nanos(row[0])

    def rotate_key(self, user_id: str, key_doc_id: str) -> int:
        key = rules.new_key_document(user_id, key_doc_id, utcnow())
        with self._write() as conn:
            row = conn.execute(f"SELECT apiKey FROM {USERS} WHERE _id = ?", (user_id,)).fetchone()
            if row is None:
                raise KeyError(user_id)
            conn.execute(f"UPDATE {USERS} SET apiKey = NULL WHERE _id = ?", (user_id,))
            stopped = (row[0] is not None) + conn.execute(
                f"UPDATE {KEYS} SET isActive = 0 WHERE name = ? AND COALESCE(isActive, 1)",
                (user_id,),
            ).rowcount
            if not self._insert(conn, KEYS, _row(key, KEY_COLUMN_KINDS)):
                raise UserExists(f"key {key_doc_id!r} exists")
        return stopped

    def set_fields(self, user_id: str, values: Mapping[str, Any]) -> None:
        with self._write() as conn:
            rows = conn.execute(
                f"SELECT _id, {_names(self.user_columns)}, extra FROM {USERS} WHERE _id = ?",
                (user_id,),
            ).fetchall()
            if not rows:
                raise KeyError(user_id)
            row = _row({**_document(rows[0], self.user_columns), **values}, self.user_columns)
            names = [*self.user_columns, "extra"]
            sets = ", ".join(f'"{name}" = ?' for name in names)
            conn.execute(
                f"UPDATE {USERS} SET {sets} WHERE _id = ?",
                (*(row.get(name) for name in names), user_id),
            )

    # -- metering -----------------------------------------------------------------------
    def hold(
        self, request_id: str, user_id: str, pool: Pool, amount: Decimal, minimum: Decimal
    ) -> Hold | InsufficientBalance:
        with self._write() as conn:
            return self._hold(conn, HoldRequest(request_id, user_id, pool, amount, minimum))

    def hold_many(self, requests: Sequence[HoldRequest]) -> list[HoldOutcome]:
        """All in one transaction (one commit): a failure fails them all."""
        try:
            with self._write() as conn:
                return [self._hold(conn, r) for r in requests]
        except StoreError as e:
            return [e] * len(requests)

    def try_hold(self, request: HoldRequest) -> HoldOutcome | None:
        """See the module's docstring. Also None for a durable or read-only store and while
        another thread tries; a lock met at any step rolls back, so None changed nothing."""
        if self.durable or self.read_only or not self._unwaiting_lock.acquire(blocking=False):
            return None
        try:
            conn = self._unwaiting_connection()
            if conn is None:
                return None
            with self._write(conn):
                return self._hold(conn, request)
        except sqlite3.Error as e:  # connecting
            return None if _busy(e) else StoreError(f"{self.path}: {e}")
        except StoreError as e:
            return (
                None
                if isinstance(e.__cause__, sqlite3.OperationalError) and _busy(e.__cause__)
                else e
            )
        finally:
            self._unwaiting_lock.release()

    def _hold(self, conn: sqlite3.Connection, r: HoldRequest) -> Hold | InsufficientBalance:
        balances = self._balances(r.user_id, r.pool, conn)
        if balances is None:
            return InsufficientBalance(ZERO)
        parts = rules.split_hold(balances, r.amount, r.minimum)
        if parts is None:
            return InsufficientBalance(sum(balances.values(), ZERO))
        self._add(conn, r.user_id, {name: -part for name, part in parts.items()})
        now = extjson.utc(utcnow())
        conn.execute(
            f"INSERT INTO {HOLDS} VALUES (?, ?, ?, ?, ?)",
            (r.request_id, r.user_id, r.pool.name, _dump_parts(parts), extjson.to_ms(now)),
        )
        return Hold(r.request_id, r.user_id, r.pool.name, parts, now)

    def settle(
        self, settlements: Iterable[Settlement], balances: dict[str, Decimal] | None = None
    ) -> list[bool]:
        now = utcnow()
        applied = []
        with self._write() as conn:
            for s in settlements:
                applied.append(self._settle(conn, s, now))
                if applied[-1] and balances is not None:
                    balances[s.request_id] = self._committed(conn, s.user_id, self.pools[s.pool])
        return applied

    def _committed(self, conn: sqlite3.Connection, user_id: str, pool: Pool) -> Decimal:
        held = conn.execute(
            f"SELECT parts FROM {HOLDS} WHERE userId = ? AND pool = ?", (user_id, pool.name)
        ).fetchall()
        fields = self._balances(user_id, pool, conn) or {}
        return committed(fields.values(), (p for row in held for p in _load_parts(row[0]).values()))

    def _settle(self, conn: sqlite3.Connection, s: Settlement, now: datetime) -> bool:
        # the log first: a request id that is already logged was settled (same transaction)
        if not self._insert(conn, LOGS, _row({**s.log, "_id": s.request_id}, LOG_COLUMN_KINDS)):
            return False
        row = conn.execute(
            f"DELETE FROM {HOLDS} WHERE _id = ? RETURNING parts", (s.request_id,)
        ).fetchone()
        held = _load_parts(row[0]) if row else {}
        pool = self.pools[s.pool]
        balances = self._balances(s.user_id, pool, conn)
        if balances is not None:
            deltas = rules.settle_deltas(balances, held, s.cost)
            self._add(conn, s.user_id, {**deltas, **rules.settlement_counters(pool, s)})
        if s.key_doc_id is not None:
            counters = (
                f"UPDATE {KEYS} SET tokensUsed = COALESCE(tokensUsed, 0) + ?,"
                " requestsCount = COALESCE(requestsCount, 0) + 1, lastUsedAt = ? WHERE _id = ?"
            )
            tokens, at = s.input_tokens + s.output_tokens, extjson.to_ms(now)
            if not conn.execute(counters, (tokens, at, s.key_doc_id)).rowcount:
                ids = [
                    r[0]
                    for r in conn.execute(f"SELECT _id FROM {KEYS} WHERE name = ?", (s.user_id,))
                ]
                conn.execute(counters, (tokens, at, rules.resolve_key_ref(s.key_doc_id, ids)))
        return True

    def open_holds(self, older_than: datetime) -> list[Hold]:
        rows = self._read(
            f"SELECT * FROM {HOLDS} WHERE createdAt < ? ORDER BY createdAt",
            (extjson.to_ms(older_than),),
        )
        return [
            Hold(
                request_id=row["_id"],
                user_id=row["userId"],
                pool=row["pool"],
                parts=_load_parts(row["parts"]),
                created_at=extjson.from_ms(row["createdAt"]),
            )
            for row in rows
        ]

    def release(self, hold: Hold) -> bool:
        with self._write() as conn:
            row = conn.execute(
                f"DELETE FROM {HOLDS} WHERE _id = ? RETURNING userId, parts", (hold.request_id,)
            ).fetchone()
            if row is None:
                return False
            self._add(conn, row["userId"], _load_parts(row["parts"]))
        return True

    # -- request logs -------------------------------------------------------------------
    def log(self, request_id: str) -> Document | None:
        return self._one(LOGS, LOG_COLUMN_KINDS, "_id", request_id)

    def logs(self, limit: int, user_id: str | None = None) -> list[Document]:
        where, params = ("WHERE userId = ?", [user_id]) if user_id is not None else ("", [])
        tail = "ORDER BY createdAt DESC, _id DESC LIMIT ?"
        return self._find(LOGS, LOG_COLUMN_KINDS, where, [*params, limit], tail)

    def logs_between(self, start: datetime | None, end: datetime) -> Iterator[Document]:
        where, params = "WHERE createdAt < ?", [extjson.to_ms(end)]
        if start is not None:
            where, params = f"{where} AND createdAt >= ?", [*params, extjson.to_ms(start)]
        yield from self._find(LOGS, LOG_COLUMN_KINDS, where, params, "ORDER BY createdAt, _id")

    def count_logs(self, before: datetime) -> int:
        rows = self._read(
            f"SELECT COUNT(*) FROM {LOGS} WHERE createdAt < ?", (extjson.to_ms(before),)
        )
        return int(rows[0][0])

    def purge_logs(self, before: datetime) -> int:
        """Deletes in chunks, so that the proxy's writes wait for one chunk at most."""
        deleted = 0
        while True:
            with self._write() as conn:
                count = conn.execute(
                    f"DELETE FROM {LOGS} WHERE rowid IN (SELECT rowid FROM {LOGS}"
                    " WHERE createdAt < ? LIMIT ?)",
                    (extjson.to_ms(before), PURGE_CHUNK),
                ).rowcount
            deleted += count
            if count < PURGE_CHUNK:
                return deleted

    # -- import -------------------------------------------------------------------------
    def _import(self, table: str, columns: Columns, doc: Document) -> ImportOutcome:
        doc = extjson.python(doc)
        if "_id" not in doc:
            raise ValueError("document without _id")
        with self._write() as conn:
            return "added" if self._insert(conn, table, _row(doc, columns)) else "skipped"

    def import_user(self, doc: Document) -> ImportOutcome:
        return self._import(USERS, self.user_columns, doc)

    def import_log(self, doc: Document) -> ImportOutcome:
        return self._import(LOGS, LOG_COLUMN_KINDS, doc)
