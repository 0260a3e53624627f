"""The production store: MongoDB, with the original's collections, field names and types
(``docs/documents.md``).

Money is stored as doubles (the rounded Decimal converted once), counts as ints, dates as
BSON dates; documents are read back as Decimal and aware UTC datetimes.

Holds live inside the user document, ``burnmeterHolds.<request id> = {pool, parts,
createdAt}``, so that a hold, its settlement and its release are each one atomic
single-document update. A hold's split over several balance fields comes from a read, and
the update's filter re-checks every field it takes from (optimistic concurrency: on a
conflict the read and the update are retried).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pymongo
from bson.decimal128 import Decimal128
from pymongo.database import Database
from pymongo.errors import ConnectionFailure
from pymongo.errors import DuplicateKeyError
from pymongo.errors import ExecutionTimeout
from pymongo.errors import InvalidOperation
from pymongo.errors import OperationFailure
from pymongo.errors import PyMongoError
from pymongo.errors import ServerSelectionTimeoutError
from pymongo.errors import WTimeoutError

from burnmeter import schema
from burnmeter.config import Pool
from burnmeter.documents import utcnow
from burnmeter.exceptions import DocumentError
from burnmeter.exceptions import StoreError
from burnmeter.exceptions import StoreMissing
from burnmeter.exceptions import UserExists
from burnmeter.money import ZERO
from burnmeter.money import is_number
from burnmeter.money import to_decimal
from burnmeter.money import to_float
from burnmeter.store import extjson
from burnmeter.store import rules
from burnmeter.store.base import KEYS
from burnmeter.store.base import LOGS
from burnmeter.store.base import USERS
from burnmeter.store.base import Document
from burnmeter.store.base import Hold
from burnmeter.store.base import ImportOutcome
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from burnmeter.store.base import committed

DEFAULT_DB = "fproxy"
HOLDS = schema.HOLDS_FIELD
SETTLED = schema.SETTLED_FIELD
LOG_MONEY = frozenset(schema.REQUEST_LOG.named("money"))
ATTEMPTS = 20
TTL_KEY = [("createdAt", pymongo.ASCENDING)]  # {createdAt: -1} is a plain index (docs/documents.md)
SERVER_TIMEOUT_MS = 3000
"""How long a call waits for an unreachable server, unless the URL's
``serverSelectionTimeoutMS`` says otherwise."""


OUTAGES = (ConnectionFailure, ExecutionTimeout, WTimeoutError, InvalidOperation)
"""Errors of a server that cannot be reached or is not answering in time (or a closed client)."""
UNAUTHORIZED = {13, 18}  # Unauthorized, AuthenticationFailed: the whole store is unusable


def _guarded[**P, R](method: Callable[P, R]) -> Callable[P, R]:
    """An unreachable server is an outage (``StoreError``); a server that refuses one
    document's update (a legacy field of the wrong type) is a ``DocumentError``."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except ServerSelectionTimeoutError as e:
            raise StoreError(_unreachable(e)) from e  # pymongo's own message is a topology dump
        except OUTAGES as e:
            raise StoreError(f"MongoDB: {e}") from e
        except OperationFailure as e:
            if e.code in UNAUTHORIZED:
                raise StoreError(f"MongoDB: {e}") from e
            raise DocumentError(f"MongoDB refused: {e}") from e
        except PyMongoError as e:
            raise StoreError(f"MongoDB: {e}") from e

    return wrapper


def _unreachable(error: ServerSelectionTimeoutError) -> str:
    """``MongoDB unreachable after 3.0 s: host:port: [Errno 111] Connection refused``,
    without pymongo's topology description and timeout settings."""
    text, _, rest = str(error).partition(", Timeout: ")
    waited = rest.split("s,", 1)[0]
    servers = re.sub(r" \(configured timeouts:[^)]*\)", "", text).split(",")
    after = f" after {waited} s" if waited else ""
    return f"MongoDB unreachable{after}: {'; '.join(s for s in servers if s.strip())}"


def _bson(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _bson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_bson(v) for v in value]
    if isinstance(value, Decimal):
        return Decimal128(value)
    if isinstance(value, datetime):
        return extjson.utc(value)
    return value


def _to_bson(doc: Mapping[str, Any], money: Collection[str]) -> Document:
    """Money fields as doubles, the way the original writes them (``docs/documents.md``)."""
    return {
        k: to_float(v) if k in money and isinstance(v, Decimal) else _bson(v)
        for k, v in doc.items()
    }


def _from_bson(doc: Mapping[str, Any], money: Collection[str]) -> Document:
    out = extjson.python({k: v for k, v in doc.items() if k not in (HOLDS, SETTLED)})
    for k in money:
        if is_number(out.get(k)):
            out[k] = to_decimal(out[k])
    return out


def _request_path(field: str, request_id: str) -> str:
    if "." in request_id or request_id.startswith("$"):
        raise ValueError(f"request id {request_id!r}: no '.' and no leading '$'")
    return f"{field}.{request_id}"


def _guard(stored: Any, part: Decimal) -> Any:
    """The filter that keeps a field from going below zero when ``part`` is taken from it."""
    if to_decimal(stored) == part:
        return stored  # the whole field: its exact stored double, which rounding may exceed
    return {"$gte": to_float(part)}


class MongoStore(Store):
    def __init__(
        self,
        db: Database[Document],
        pools: Mapping[str, Pool],
        client: pymongo.MongoClient[Document] | None = None,
    ) -> None:
        """``db`` from a ``tz_aware`` client; ``client``, if given, is closed by ``close``."""
        super().__init__(pools)
        self.db = db
        self._client = client
        self.money = set(schema.USER.named("money"))
        for pool in self.pools.values():
            self.money.update([*pool.balance, pool.used])

    @classmethod
    def from_url(cls, url: str, pools: Mapping[str, Pool]) -> MongoStore:
        """A client that waits ``SERVER_TIMEOUT_MS`` for the server, or what the URL's
        ``serverSelectionTimeoutMS`` option says."""
        query = parse_qs(urlsplit(url).query)
        timeout: dict[str, Any] = (
            {}
            if any(k.lower() == "serverselectiontimeoutms" for k in query)
            else {"serverSelectionTimeoutMS": SERVER_TIMEOUT_MS}
        )
        try:
            client: pymongo.MongoClient[Document] = pymongo.MongoClient(
                url, tz_aware=True, **timeout
            )
        except PyMongoError as e:
            raise StoreError(f"MongoDB URL: {e}") from e
        return cls(client.get_default_database(DEFAULT_DB), pools, client)

    @_guarded
    def check_exists(self) -> None:
        """``StoreMissing`` unless the database holds the users collection."""
        if USERS not in self.db.list_collection_names():
            raise StoreMissing(f"MongoDB database {self.db.name!r}: no {USERS} collection")

    @_guarded
    def probe_write(self, timeout: float) -> None:
        """A ``ping`` within ``timeout``; a replica set must also have a primary now."""
        reply = self.db.command("ping", maxTimeMS=max(1, int(timeout * 1000)))
        if not reply.get("ok"):
            raise StoreError("MongoDB: ping failed")
        if self._client is not None and self._client.topology_description.topology_type_name in (
            "ReplicaSetNoPrimary",
        ):
            raise StoreError("MongoDB: the replica set has no primary")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # -- set-up -------------------------------------------------------------------------
    @_guarded
    def ensure_schema(self, log_ttl_days: int | None) -> None:
        """Creates the indexes of ``docs/documents.md`` unless an index on the same keys exists (the original's
        mongoose indexes, e.g. the unique sparse ``apiKey_1``, are kept as they are).

        The TTL index is ``{createdAt: 1}``, the one mongoose's ``expires`` created, so that
        it coexists with the plain ``{createdAt: -1}``. A different expiry is changed in
        place with ``collMod``; 0 (keep forever) drops an existing TTL index.
        """
        logs = self.db[LOGS]
        self._index(logs, [("creditType", 1), ("createdAt", -1)])
        self._index(logs, [("userId", 1), ("createdAt", -1)])
        self._index(logs, [("createdAt", -1)])
        self._index(self.db[USERS], [("apiKey", 1)], sparse=True)
        if log_ttl_days is None:
            return
        ttl = self._existing(logs, TTL_KEY)
        seconds = log_ttl_days * 86400
        if ttl is None:
            if seconds:
                logs.create_index(TTL_KEY, expireAfterSeconds=seconds)
        elif not seconds:
            if "expireAfterSeconds" in ttl[1]:
                logs.drop_index(ttl[0])
        elif ttl[1].get("expireAfterSeconds") != seconds:
            self.db.command(
                {"collMod": LOGS, "index": {"name": ttl[0], "expireAfterSeconds": seconds}}
            )

    @staticmethod
    def _existing(
        collection: pymongo.collection.Collection[Document], keys: list[tuple[str, int]]
    ) -> tuple[str, dict[str, Any]] | None:
        for name, info in collection.index_information().items():
            if [(k, int(d)) for k, d in info["key"]] == keys:
                return name, info
        return None

    def _index(
        self,
        collection: pymongo.collection.Collection[Document],
        keys: list[tuple[str, int]],
        **options: Any,
    ) -> None:
        if self._existing(collection, keys) is None:
            collection.create_index(keys, **options)

    # -- keys and users -----------------------------------------------------------------
    def _one(self, collection: str, query: Document, money: Collection[str]) -> Document | None:
        doc = self.db[collection].find_one(query)
        return None if doc is None else _from_bson(doc, money)

    @_guarded
    def find_key(self, key: str) -> KeyOwner | None:
        return rules.find_key(
            key,
            key_doc=lambda key_id: self._one(KEYS, {"_id": key_id}, ()),
            user=self.user,
            user_by_api_key=lambda k: self._one(USERS, {"apiKey": k}, self.money),
        )

    @_guarded
    def user(self, user_id: str) -> Document | None:
        return self._one(USERS, {"_id": user_id}, self.money)

    @_guarded
    def users(self) -> list[Document]:
        return [_from_bson(doc, self.money) for doc in self.db[USERS].find().sort("_id", 1)]

    @_guarded
    def balance(self, user_id: str, pool: Pool) -> Decimal:
        doc = self.db[USERS].find_one({"_id": user_id}, projection=pool.balance) or {}
        return sum((to_decimal(doc.get(name)) for name in pool.balance), ZERO)

    @_guarded
    def create_user(self, user_id: str, key_doc_id: str, balances: Mapping[str, Decimal]) -> None:
        user, key = rules.new_user_documents(
            user_id, key_doc_id, balances, self.pools.values(), utcnow()
        )
        for collection, doc in ((USERS, user), (KEYS, key)):
            try:
                self.db[collection].insert_one(_to_bson(doc, self.money))
            except DuplicateKeyError:
                raise UserExists(f"{collection} {doc['_id']!r} exists") from None

    @_guarded
    def topup(self, user_id: str, field_name: str, amount: Decimal) -> Decimal:
        if field_name not in self.money:
            raise ValueError(f"{field_name!r} is not a money field")
        doc = self.db[USERS].find_one_and_update(
            {"_id": user_id},
            {"$inc": {field_name: to_float(amount)}},
            projection=[field_name],
            return_document=pymongo.ReturnDocument.AFTER,
        )
        if doc is None:
            raise KeyError(user_id)
        return to_decimal(doc[field_name])

    @_guarded
    def rotate_key(self, user_id: str, key_doc_id: str) -> int:
        user = self.db[USERS].find_one_and_update(
            {"_id": user_id}, {"$unset": {"apiKey": ""}}, projection=["apiKey"]
        )
        if user is None:
            raise KeyError(user_id)
        stopped = (
            self.db[KEYS]
            .update_many(
                {"name": user_id, "isActive": {"$ne": False}}, {"$set": {"isActive": False}}
            )
            .modified_count
        )
        try:
            self.db[KEYS].insert_one(
                _to_bson(rules.new_key_document(user_id, key_doc_id, utcnow()), ())
            )
        except DuplicateKeyError:
            raise UserExists(f"{KEYS} {key_doc_id!r} exists") from None
        return stopped + bool(user.get("apiKey"))

    @_guarded
    def set_fields(self, user_id: str, values: Mapping[str, Any]) -> None:
        result = self.db[USERS].update_one({"_id": user_id}, {"$set": _to_bson(values, self.money)})
        if result.matched_count == 0:
            raise KeyError(user_id)

    # -- metering -----------------------------------------------------------------------
    @_guarded
    def hold(
        self, request_id: str, user_id: str, pool: Pool, amount: Decimal, minimum: Decimal
    ) -> Hold | InsufficientBalance:
        path = _request_path(HOLDS, request_id)
        users = self.db[USERS]
        for _ in range(ATTEMPTS):
            doc = users.find_one({"_id": user_id}, projection=[*pool.balance, path])
            if doc is None:
                return InsufficientBalance(ZERO)
            if request_id in doc.get(HOLDS, {}):
                raise ValueError(f"request {request_id!r} already holds")
            for name in pool.balance:
                value = doc.get(name)
                if not (value is None or is_number(value) or isinstance(value, Decimal128)):
                    # a string, say: the update's filter could never match it
                    raise DocumentError(f"user {user_id!r}: {name} is not a number")
            balances = {name: to_decimal(doc.get(name)) for name in pool.balance}
            parts = rules.split_hold(balances, amount, minimum)
            if parts is None:
                return InsufficientBalance(sum(balances.values(), ZERO))
            now = extjson.utc(utcnow())
            query: Document = {"_id": user_id, path: {"$exists": False}}
            query |= {name: _guard(doc.get(name), part) for name, part in parts.items()}
            stored = {name: to_float(part) for name, part in parts.items()}
            update = {
                "$inc": {name: -value for name, value in stored.items()},
                "$set": {path: {"pool": pool.name, "parts": stored, "createdAt": now}},
            }
            if users.update_one(query, update).modified_count:
                return Hold(request_id, user_id, pool.name, parts, now)
        # one busy user, not an outage of the store
        raise DocumentError(f"hold for {user_id!r}: the balance kept changing, gave up")

    @_guarded
    def settle(
        self, settlements: Iterable[Settlement], balances: dict[str, Decimal] | None = None
    ) -> list[bool]:
        return [self._settle(s, balances) for s in settlements]

    def _settle(self, s: Settlement, balances: dict[str, Decimal] | None = None) -> bool:
        """(1) a logged request is done; (2) charge and release the hold in one update;
        (3) insert the log; (4) bump the key's counters and drop the settled mark.

        Step 2 also sets ``burnmeterSettled.<request id>``, which step 4 removes: a retry
        after a failure between 2 and 3 finds the mark and logs without charging again.
        Crash windows: before 2, nothing happened and the hold sweep returns the hold;
        between 2 and 3, the request is charged but unlogged until a retry; between 3 and
        4, the key's counters miss one request and the mark stays in the user document.
        """
        if self.db[LOGS].find_one({"_id": s.request_id}, projection=["_id"]):
            return False
        charged: dict[str, Decimal] | None = {} if balances is not None else None
        marked = self._charge(s, charged)
        try:
            self.db[LOGS].insert_one(_to_bson({**s.log, "_id": s.request_id}, LOG_MONEY))
            applied = True
        except DuplicateKeyError:
            applied = False
        if applied and s.key_doc_id is not None:
            ids = [d["_id"] for d in self.db[KEYS].find({"name": s.user_id}, projection=["_id"])]
            self.db[KEYS].update_one(
                {"_id": rules.resolve_key_ref(s.key_doc_id, ids)},
                {
                    "$inc": {"tokensUsed": s.input_tokens + s.output_tokens, "requestsCount": 1},
                    "$set": {"lastUsedAt": extjson.utc(utcnow())},
                },
            )
        if marked:
            mark = _request_path(SETTLED, s.request_id)
            self.db[USERS].update_one({"_id": s.user_id}, {"$unset": {mark: ""}})
        if applied and balances is not None and charged:
            balances |= charged
        return applied

    def _charge(self, s: Settlement, left: dict[str, Decimal] | None = None) -> bool:
        """Step 2 of ``_settle``; True when the settled mark is in the user document. If this
        call charged, the pool's committed balance it left goes to ``left``."""
        hold_path = _request_path(HOLDS, s.request_id)
        mark = _request_path(SETTLED, s.request_id)
        pool = self.pools[s.pool]
        users = self.db[USERS]
        counters = rules.settlement_counters(pool, s)
        for _ in range(ATTEMPTS):
            doc = users.find_one({"_id": s.user_id}, projection=[*pool.balance, hold_path, mark])
            if doc is None:
                return False
            if s.request_id in doc.get(SETTLED, {}):
                return True
            hold = doc.get(HOLDS, {}).get(s.request_id)
            held = {name: to_decimal(v) for name, v in hold["parts"].items()} if hold else {}
            balances = {name: to_decimal(doc.get(name)) for name in pool.balance}
            deltas = rules.settle_deltas(balances, held, s.cost)
            if hold is None and not deltas and not counters:
                return False  # nothing to charge (a refused request logged at cost 0)
            query: Document = {"_id": s.user_id, hold_path: {"$exists": hold is not None}}
            if hold is None:
                query[mark] = {"$exists": False}
            if s.cost > sum(held.values(), ZERO):
                query |= {name: doc.get(name) for name in pool.balance}  # the split read them
            update: Document = {
                "$inc": {
                    name: to_float(v) if isinstance(v, Decimal) else v
                    for name, v in {**deltas, **counters}.items()
                },
                "$set": {mark: extjson.utc(utcnow())},
            }
            if hold is not None:
                update["$unset"] = {hold_path: ""}
            if left is None:
                if users.update_one(query, update).modified_count:
                    return True
                continue
            # the balance it left, read in the same atomic update (its post-image)
            charged = users.find_one_and_update(
                query,
                update,
                projection=[*pool.balance, HOLDS],
                return_document=pymongo.ReturnDocument.AFTER,
            )
            if charged is not None:
                left[s.request_id] = self._committed(charged, pool)
                return True
        raise StoreError(f"settle for {s.user_id!r}: the balance kept changing, gave up")

    @staticmethod
    def _committed(doc: Document, pool: Pool) -> Decimal:
        holds = (h for h in doc.get(HOLDS, {}).values() if h.get("pool") == pool.name)
        return committed(
            (to_decimal(doc.get(name)) for name in pool.balance),
            (to_decimal(v) for h in holds for v in h["parts"].values()),
        )

    @_guarded
    def open_holds(self, older_than: datetime) -> list[Hold]:
        query = {HOLDS: {"$exists": True, "$ne": {}}}
        holds = []
        for doc in self.db[USERS].find(query, projection=[HOLDS]):
            for request_id, hold in extjson.python(doc[HOLDS]).items():
                if hold["createdAt"] < older_than:
                    parts = {name: to_decimal(v) for name, v in hold["parts"].items()}
                    holds.append(
                        Hold(request_id, doc["_id"], hold["pool"], parts, hold["createdAt"])
                    )
        return sorted(holds, key=lambda h: h.created_at)

    @_guarded
    def release(self, hold: Hold) -> bool:
        path = _request_path(HOLDS, hold.request_id)
        result = self.db[USERS].update_one(
            {"_id": hold.user_id, path: {"$exists": True}},
            {
                "$inc": {name: to_float(part) for name, part in hold.parts.items()},
                "$unset": {path: ""},
            },
        )
        return result.modified_count == 1

    # -- request logs -------------------------------------------------------------------
    @_guarded
    def log(self, request_id: str) -> Document | None:
        return self._one(LOGS, {"_id": request_id}, LOG_MONEY)

    @_guarded
    def logs(self, limit: int, user_id: str | None = None) -> list[Document]:
        query = {} if user_id is None else {"userId": user_id}
        cursor = self.db[LOGS].find(query).sort([("createdAt", -1), ("_id", -1)]).limit(limit)
        return [_from_bson(doc, LOG_MONEY) for doc in cursor]

    def logs_between(self, start: datetime | None, end: datetime) -> Iterator[Document]:
        created: dict[str, Any] = {"$lt": extjson.utc(end)}
        if start is not None:
            created["$gte"] = extjson.utc(start)
        try:
            for doc in self.db[LOGS].find({"createdAt": created}).sort([("createdAt", 1)]):
                yield _from_bson(doc, LOG_MONEY)
        except PyMongoError as e:
            raise StoreError(f"MongoDB: {e}") from e

    @_guarded
    def count_logs(self, before: datetime) -> int:
        return self.db[LOGS].count_documents({"createdAt": {"$lt": extjson.utc(before)}})

    @_guarded
    def purge_logs(self, before: datetime) -> int:
        return self.db[LOGS].delete_many({"createdAt": {"$lt": extjson.utc(before)}}).deleted_count

    # -- import -------------------------------------------------------------------------
    def _import(self, collection: str, doc: Document, money: Collection[str]) -> ImportOutcome:
        doc = extjson.python(doc)
        if "_id" not in doc:
            raise ValueError("document without _id")
        try:
            self.db[collection].insert_one(_to_bson(doc, money))
        except DuplicateKeyError:
            return "skipped"
        return "added"

    @_guarded
    def import_user(self, doc: Document) -> ImportOutcome:
        return self._import(USERS, doc, self.money)

    @_guarded
    def import_log(self, doc: Document) -> ImportOutcome:
        return self._import(LOGS, doc, LOG_MONEY)
