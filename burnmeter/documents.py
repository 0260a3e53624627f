"""Key handling and the request_logs document (``docs/documents.md``)."""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from typing import Any

from burnmeter.records import UsageRecord
from burnmeter.text import bounded

KEY_PREFIX = "sk-burn-"
HASHED_PREFIX = "sha256:"


def new_key() -> str:
    """A fresh client key: 256 random bits."""
    return KEY_PREFIX + secrets.token_hex(32)


def hash_key(key: str) -> str:
    """The user_keys._id burnmeter stores for keys it creates: never the key itself."""
    return HASHED_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


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


BILLED_DETAIL_FIELDS = {
    # request_logs field: UsageRecord field; written only when set (absent reads as 0 / none)
    "cacheWrite1hTokens": "cache_write_1h_tokens",
    "inputAudioTokens": "input_audio_tokens",
    "inputImageTokens": "input_image_tokens",
    "cacheAudioReadTokens": "cache_audio_read_tokens",
    "cacheImageReadTokens": "cache_image_read_tokens",
    "outputAudioTokens": "output_audio_tokens",
    "outputImageTokens": "output_image_tokens",
    "webSearchRequests": "web_search_requests",
    "codeExecutions": "code_executions",
    "serviceTier": "service_tier",
}
"""burnmeter's optional request-log fields: the billed classes beyond the original's token
counts (``docs/documents.md``), so that a cost can be recomputed from the log alone (``usage_of_log``; the route's
multiplier is ``routeMultiplier``, a decimal string)."""


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
    details = {
        name: value
        for name, attribute in BILLED_DETAIL_FIELDS.items()
        if (value := getattr(u, attribute))
    }
    return {
        "_id": request_id,
        "userId": user_id,
        "userKeyId": bounded(key_mask),
        "model": bounded(model) if model is not None else None,
        "inputTokens": u.input_tokens,
        "outputTokens": u.output_tokens,
        "cacheWriteTokens": u.cache_write_tokens,
        "cacheHitTokens": u.cache_read_tokens,
        "reasoningTokens": u.reasoning_tokens,
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
        **details,
        **({"routeMultiplier": str(route_multiplier)} if route_multiplier is not None else {}),
    }


def usage_of_log(log: dict[str, Any]) -> UsageRecord:
    """The usage a request-log document records (missing or malformed counts are 0)."""

    def count(name: str) -> int:
        value = log.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    tier = log.get("serviceTier")
    recorded = UsageRecord(
        input_tokens=count("inputTokens"),
        output_tokens=count("outputTokens"),
        cache_read_tokens=count("cacheHitTokens"),
        cache_write_tokens=count("cacheWriteTokens"),
        reasoning_tokens=count("reasoningTokens"),
        service_tier=tier if isinstance(tier, str) else None,
    )
    details: dict[str, Any] = {
        attribute: count(name)
        for name, attribute in BILLED_DETAIL_FIELDS.items()
        if attribute != "service_tier"
    }
    return dataclasses.replace(recorded, **details).clamped()
