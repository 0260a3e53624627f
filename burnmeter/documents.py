"""Key handling and the request_logs document (``docs/documents.md``)."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from typing import Any

from burnmeter import schema
from burnmeter.records import UsageRecord
from burnmeter.text import bounded

KEY_PREFIX = "sk-burn-"
HASHED_PREFIX = "sha256:"


def new_key() -> str:
    """A fresh client key: 256 random bits."""
    return KEY_PREFIX + secrets.token_hex(32)


def hash_key(key: str) -> str:
    """The user_keys._id burnmeter stores for keys it creates, and every other place that
    must tell keys apart without keeping one (the key cache, rate-limit budgets). A key read
    from headers that are not UTF-8 (surrogate escapes) hashes too: such a key is refused
    (401), never an exception."""
    return HASHED_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_ref(key_doc_id: str) -> str:
    """A user_keys._id as settlements and the journal carry it: hashed when it is a raw key.

    Documents of the original system (``docs/documents.md``) use the raw key as ``_id``; the store maps the hash
    back to that document (``Store.settle``), so no raw key is ever written outside it."""
    return key_doc_id if key_doc_id.startswith(HASHED_PREFIX) else hash_key(key_doc_id)


def mask_key(key: str) -> str:
    """What logs show of a key: a short prefix and the last four characters."""
    if len(key) <= 12:
        return "…" + key[-2:] if len(key) > 4 else "…"
    return f"{key[:7]}…{key[-4:]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


USAGE_FIELDS = tuple((f, f.usage) for f in schema.REQUEST_LOG.fields if f.usage is not None)
"""The request-log fields that record a usage class (``burnmeter/schema.py``): the original's
token counts always, burnmeter's optional classes only when set, so that a cost can be
recomputed from the log alone (``usage_of_log``; the route's multiplier is ``routeMultiplier``,
a decimal string)."""


def _usage_fields(u: UsageRecord) -> dict[str, Any]:
    return {
        f.name: value
        for f, attribute in USAGE_FIELDS
        if (value := getattr(u, attribute)) or not f.optional
    }


def request_log(
    *,
    request_id: str,
    user_id: str,
    key_mask: str,
    model: str | None,
    usage: UsageRecord | None,
    cost: Decimal,
    billing_tokens: int,
    pool: str,
    status_code: int,
    latency_ms: int,
    ttft_ms: int | None,
    host: str,
    upstream: str,
    path: str,
    stream: bool,
    created_at: datetime,
    route_multiplier: Decimal | None = None,
) -> dict[str, Any]:
    """One request_logs document with the original's fields and burnmeter's own
    (``docs/documents.md``).

    The client-controlled strings are bounded and made encodable here, so that the
    document (and the journal record carrying it) can always be written."""
    u = usage or UsageRecord(source="none")
    return {
        "_id": request_id,
        "userId": user_id,
        "userKeyId": bounded(key_mask),
        "model": bounded(model) if model is not None else None,
        **_usage_fields(u),
        "creditsCost": cost,
        "creditType": pool,
        "tokensUsed": billing_tokens,
        "statusCode": status_code,
        "latencyMs": latency_ms,
        "ttftMs": ttft_ms,
        "isSuccess": 200 <= status_code < 300,
        "createdAt": created_at,
        "host": bounded(host),
        "upstream": bounded(upstream),
        "path": bounded(path),
        "stream": stream,
        "usageSource": u.source if usage is not None else "none",
        **({"routeMultiplier": str(route_multiplier)} if route_multiplier is not None else {}),
    }


def usage_of_log(log: dict[str, Any]) -> UsageRecord:
    """The usage a request-log document records (missing or malformed counts are 0)."""

    def count(name: str) -> int:
        value = log.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    recorded: dict[str, Any] = {
        attribute: count(f.name) if f.kind == "int" else _text(log.get(f.name))
        for f, attribute in USAGE_FIELDS
    }
    return UsageRecord(**recorded).clamped()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
