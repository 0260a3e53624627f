"""The rules both backends share: key look-up order and how holds and charges spread
over a pool's balance fields.

Balances are passed in the pool's spending order. Only the *sum* of a pool may go below
zero (the bounded overdraft of one request's estimation error), and only by a settlement.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal

from burnmeter.config import Pool
from burnmeter.documents import HASHED_PREFIX
from burnmeter.documents import hash_key
from burnmeter.documents import key_ref
from burnmeter.documents import utcnow
from burnmeter.money import ZERO
from burnmeter.store.base import Document
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Settlement

Lookup = Callable[[str], Document | None]


def find_key(key: str, key_doc: Lookup, user: Lookup, user_by_api_key: Lookup) -> KeyOwner | None:
    """user_keys by the raw key as _id, then by its hash, then usersNew.apiKey.

    A presented ``sha256:…`` string is never a key: it is what the store holds."""
    if key.startswith(HASHED_PREFIX):
        return None
    expired: KeyOwner | None = None
    for key_doc_id in (key, hash_key(key)):
        doc = key_doc(key_doc_id)
        if doc is None:
            continue
        owner = user(doc["name"]) if isinstance(doc.get("name"), str) else None
        if owner is None:
            return None
        expires = doc.get("expiresAt")
        found = KeyOwner(
            user_id=owner["_id"],
            key_doc_id=key_doc_id,
            key_active=bool(doc.get("isActive", True)),
            key_expires_at=expires if isinstance(expires, datetime) else None,
            user=owner,
        )
        if found.key_expires_at is None or found.key_expires_at > utcnow():
            return found
        # The original's payment keys expire with their package, and it then deleted them
        # (docs/documents.md, user_keys):
        # the same key may still be the user's usersNew.apiKey, for pools still valid.
        expired = found
    owner = user_by_api_key(key)
    if owner is None:
        return expired
    return KeyOwner(owner["_id"], None, True, None, owner)


def _take(balances: Mapping[str, Decimal], want: Decimal) -> dict[str, Decimal]:
    """Up to ``want`` from the fields in order, never taking a field below zero."""
    parts: dict[str, Decimal] = {}
    for name, value in balances.items():
        part = min(want, max(ZERO, value))
        if part > 0:
            parts[name] = part
            want -= part
    return parts


def split_hold(
    balances: Mapping[str, Decimal], amount: Decimal, minimum: Decimal
) -> dict[str, Decimal] | None:
    """The parts of a hold, or None to refuse (see ``Store.hold``): an empty or overdrawn
    pool is refused whatever the request costs, even nothing (a free or tiny estimate)."""
    available = max(ZERO, sum(balances.values(), ZERO))
    if available <= 0:
        return None
    if available >= amount:
        return _take(balances, amount)
    if available > 0 and available >= minimum:
        return _take(balances, available)
    return None


def settle_deltas(
    balances: Mapping[str, Decimal], held: Mapping[str, Decimal], cost: Decimal
) -> dict[str, Decimal]:
    """The change of each balance field when ``cost`` settles a hold of ``held``.

    The cost is taken from the held parts first; the rest of the hold goes back. What
    the hold does not cover is taken from the current ``balances`` in order, and what
    they cannot cover is charged to the first field, which then goes negative.
    """
    deltas: dict[str, Decimal] = {}
    remaining = cost
    for name, part in held.items():
        charged = min(part, remaining)
        deltas[name] = part - charged
        remaining -= charged
    if remaining > 0:
        for name, part in _take(balances, remaining).items():
            deltas[name] = deltas.get(name, ZERO) - part
            remaining -= part
        first = next(iter(balances))
        deltas[first] = deltas.get(first, ZERO) - remaining
    return {name: delta for name, delta in deltas.items() if delta}


def settlement_counters(pool: Pool, s: Settlement) -> dict[str, Decimal | int]:
    """The user-document counters a settlement increments (zero increments left out)."""
    counters: dict[str, Decimal | int] = {
        pool.used: s.cost,
        "totalInputTokens": s.input_tokens,
        "totalOutputTokens": s.output_tokens,
    }
    if pool.tokens:
        counters[pool.tokens] = s.billing_tokens
    return {name: value for name, value in counters.items() if value}


def new_user_documents(
    user_id: str,
    key_doc_id: str,
    balances: Mapping[str, Decimal],
    pools: Iterable[Pool],
    now: datetime,
) -> tuple[Document, Document]:
    """The usersNew and user_keys documents of ``Store.create_user``: the counters a
    settlement bumps start at zero, balances not given stay missing."""
    counters: Document = {"totalInputTokens": 0, "totalOutputTokens": 0}
    for pool in pools:
        counters[pool.used] = ZERO
        if pool.tokens:
            counters[pool.tokens] = 0
    user = {
        "_id": user_id,
        "isActive": True,
        "role": "user",
        **balances,
        **counters,
        "createdAt": now,
    }
    return user, new_key_document(user_id, key_doc_id, now)


def new_key_document(user_id: str, key_doc_id: str, now: datetime) -> Document:
    """A user_keys document: an active key of ``user_id``, its counters at zero."""
    return {
        "_id": key_doc_id,
        "name": user_id,
        "isActive": True,
        "tokensUsed": 0,
        "requestsCount": 0,
        "createdAt": now,
    }


def resolve_key_ref(ref: str, key_doc_ids: Iterable[str]) -> str | None:
    """The user_keys._id among ``key_doc_ids`` that a settlement's ``key_doc_id`` names."""
    for key_doc_id in key_doc_ids:
        if key_doc_id == ref or key_ref(key_doc_id) == ref:
            return key_doc_id
    return None
