"""The store interface both backends implement (SQLite embedded, MongoDB production).

Documents are exchanged as MongoDB-shaped dicts with the field names of ``docs/documents.md``: money as
``Decimal`` USD, dates as timezone-aware UTC ``datetime``. A field missing from a stored
document is missing from the dict too.

Every operation is synchronous and thread-safe; the proxy calls them from worker threads,
never from mitmproxy's event loop, except ``try_hold``, which never waits.
"""

from __future__ import annotations

from abc import ABC
from abc import abstractmethod
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from decimal import Decimal
from typing import Any
from typing import Literal

from burnmeter import schema
from burnmeter.config import Pool
from burnmeter.exceptions import DocumentError
from burnmeter.exceptions import StoreError

Document = dict[str, Any]
ImportOutcome = Literal["added", "skipped"]

USERS = schema.USER.name
KEYS = schema.KEY.name
LOGS = schema.REQUEST_LOG.name


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """Who a client key belongs to, as found by ``Store.find_key``."""

    user_id: str
    key_doc_id: str | None  # user_keys._id that matched (raw or hashed), None for usersNew.apiKey
    key_active: bool
    key_expires_at: datetime | None
    user: Document  # the usersNew document (balances as Decimal, dates as aware datetimes)


@dataclass(frozen=True, slots=True)
class Hold:
    """Money set aside for one request: ``parts`` says how much came from each balance field."""

    request_id: str
    user_id: str
    pool: str
    parts: dict[str, Decimal]
    created_at: datetime

    @property
    def amount(self) -> Decimal:
        return sum(self.parts.values(), Decimal(0))


@dataclass(frozen=True, slots=True)
class InsufficientBalance:
    """A hold that could not be made: the pool's balance right now."""

    balance: Decimal


@dataclass(frozen=True, slots=True)
class HoldRequest:
    """The arguments of one ``Store.hold``, for ``Store.hold_many``."""

    request_id: str
    user_id: str
    pool: Pool
    amount: Decimal
    minimum: Decimal


HoldOutcome = Hold | InsufficientBalance | StoreError | DocumentError


@dataclass(frozen=True, slots=True)
class Settlement:
    """The actual charge of one request, applied once: release the hold, charge, log."""

    request_id: str
    user_id: str
    pool: str
    cost: Decimal
    billing_tokens: int
    input_tokens: int
    output_tokens: int
    key_doc_id: str | None
    log: Document = field(default_factory=dict)  # the request_logs document, _id = request_id


def committed(balances: Iterable[Decimal], holds: Iterable[Decimal]) -> Decimal:
    """A pool's balance fields plus the parts of the user's open holds on it: what is left
    once the requests in flight settle at nothing. Holds and releases leave it as it is;
    each settlement lowers it by exactly its cost (a top-up raises it)."""
    return sum(balances, Decimal(0)) + sum(holds, Decimal(0))


class Store(ABC):
    """One backend. ``pools`` are the config's pools: they name the balance fields."""

    def __init__(self, pools: Mapping[str, Pool]) -> None:
        self.pools = dict(pools)

    # -- set-up -------------------------------------------------------------------------
    @abstractmethod
    def ensure_schema(self, log_ttl_days: int | None) -> None:
        """Create tables/collections and the indexes of ``docs/documents.md``. Never deletes a log itself;
        a backend with a TTL index sets it to ``log_ttl_days`` (0 = keep forever, None =
        leave it as it is: only the proxy's config sets retention)."""

    @abstractmethod
    def close(self) -> None: ...

    def probe_write(self, timeout: float) -> None:
        """Raise ``StoreError`` unless a write (a hold) could start now, within ``timeout``
        seconds: a readiness check, not only a read. Changes nothing."""
        raise NotImplementedError

    # -- keys and users -----------------------------------------------------------------
    @abstractmethod
    def find_key(self, key: str) -> KeyOwner | None:
        """user_keys by _id (raw, then hashed), then usersNew.apiKey; None if unknown."""

    @abstractmethod
    def user(self, user_id: str) -> Document | None: ...

    @abstractmethod
    def users(self) -> list[Document]: ...

    @abstractmethod
    def balance(self, user_id: str, pool: Pool) -> Decimal:
        """Σ of the pool's balance fields (0 for an unknown user)."""

    @abstractmethod
    def create_user(self, user_id: str, key_doc_id: str, balances: Mapping[str, Decimal]) -> None:
        """New active user with one user_keys document; ``balances`` by balance field.

        Raises ``UserExists`` when the user exists."""

    @abstractmethod
    def topup(self, user_id: str, field_name: str, amount: Decimal) -> Decimal:
        """Add to one balance field; returns its new value. ``KeyError`` for an unknown user."""

    @abstractmethod
    def rotate_key(self, user_id: str, key_doc_id: str) -> int:
        """Give the user one new active key (user_keys ``key_doc_id``); every key it had
        stops working: its user_keys documents are deactivated and usersNew.apiKey removed.
        Returns how many keys stopped. ``KeyError`` for an unknown user."""

    @abstractmethod
    def set_fields(self, user_id: str, values: Mapping[str, Any]) -> None:
        """$set on the user document (isActive, expiry dates). ``KeyError`` if unknown."""

    # -- metering -----------------------------------------------------------------------
    @abstractmethod
    def hold(
        self, request_id: str, user_id: str, pool: Pool, amount: Decimal, minimum: Decimal
    ) -> Hold | InsufficientBalance:
        """Atomically set aside ``amount`` from the pool, spending its fields in order.

        If the balance is short of ``amount`` but covers ``minimum`` (and is > 0), hold what
        is left; otherwise refuse. Never takes a field below zero."""

    def hold_many(self, requests: Sequence[HoldRequest]) -> list[HoldOutcome]:
        """``hold`` for each request in turn, each on its own: a store that fails one
        request says so in its place (``StoreError``, ``DocumentError``) and goes on. A store
        may make them all in one transaction, where a failure fails them all."""
        outcomes: list[HoldOutcome] = []
        for r in requests:
            try:
                outcomes.append(self.hold(r.request_id, r.user_id, r.pool, r.amount, r.minimum))
            except (StoreError, DocumentError) as e:
                outcomes.append(e)
        return outcomes

    def try_hold(self, request: HoldRequest) -> HoldOutcome | None:
        """``hold``'s outcome if it can be made without waiting for anything (a lock, a
        sync, the network), else None, having changed nothing: a backend that cannot
        promise that returns None, and the caller makes the hold on a thread."""
        return None

    @abstractmethod
    def settle(
        self, settlements: Iterable[Settlement], balances: dict[str, Decimal] | None = None
    ) -> list[bool]:
        """Apply each settlement once (idempotent by request id); True where it was applied.

        Charges ``cost`` to the pool (from the hold first), releases the rest of the hold,
        bumps used/token counters and the key's counters, and inserts the log document.

        ``balances``, if given, receives for each settlement applied (by request id) its
        pool's ``committed`` balance right after it, read atomically with the charge."""

    @abstractmethod
    def open_holds(self, older_than: datetime) -> list[Hold]: ...

    @abstractmethod
    def release(self, hold: Hold) -> bool:
        """Give an abandoned hold back to the pool (idempotent)."""

    # -- request logs -------------------------------------------------------------------
    @abstractmethod
    def log(self, request_id: str) -> Document | None: ...

    @abstractmethod
    def logs(self, limit: int, user_id: str | None = None) -> list[Document]:
        """Newest first."""

    @abstractmethod
    def logs_between(self, start: datetime | None, end: datetime) -> Iterator[Document]:
        """Logs created in ``[start, end)`` (``start`` None: no lower bound), oldest first."""

    @abstractmethod
    def count_logs(self, before: datetime) -> int:
        """How many logs were created before ``before`` (what ``purge_logs`` would delete)."""

    @abstractmethod
    def purge_logs(self, before: datetime) -> int:
        """Delete logs created before ``before`` (the TTL, for backends without one)."""

    # -- import -------------------------------------------------------------------------
    @abstractmethod
    def import_user(self, doc: Document) -> ImportOutcome: ...

    @abstractmethod
    def import_log(self, doc: Document) -> ImportOutcome: ...
