"""The documents burnmeter stores, declared once: the user, key and request-log documents.

Each field is one line of data: its name (the MongoDB field and the SQLite column alike), its
kind, whose field it is (the original system's or burnmeter's own), and where the request log
takes it from a usage record. ``docs/documents.md`` describes every field in words and
``tests/test_schema.py`` checks that it lists these; ``docs/formats.md`` has the SQLite schema.
The stores (``burnmeter/store/``), ``burnmeter import``, the request log's builder and reader
(``burnmeter/documents.py``) and the CLI's ``logs`` table read their field lists from here.

A kind fixes a field's type in both stores (``SQLITE_TYPES``, ``MONGO_TYPES``): money is a
double in MongoDB, as the original wrote it, and INTEGER nano-USD in SQLite; a date is a BSON
date and INTEGER epoch milliseconds UTC. Adding a field is one line here; SQLite adds its column
when a store opens for writing, MongoDB needs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["text", "int", "money", "date", "bool", "object"]
Origin = Literal["original", "burnmeter"]

SQLITE_TYPES: dict[Kind, str] = {
    "text": "TEXT",
    "int": "INTEGER",
    "money": "INTEGER",  # nano-USD
    "date": "INTEGER",  # epoch milliseconds UTC
    "bool": "INTEGER",  # 0 / 1
}
MONGO_TYPES: dict[Kind, str] = {
    "text": "string",
    "int": "int",
    "money": "double",
    "date": "date",
    "bool": "bool",
    "object": "object",
}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    origin: Origin
    usage: str | None = None
    """The ``UsageRecord`` attribute a request-log field records."""
    optional: bool = False
    """Written only when set (a usage class most requests do not have); absent reads as 0."""
    listed: int | None = None
    """Its place among the columns of ``burnmeter logs``' table (JSON has every field)."""

    @property
    def column(self) -> bool:
        """Kept in a SQLite column of its own (else in the row's ``extra`` JSON)."""
        return self.kind in SQLITE_TYPES and self.name != "_id"


@dataclass(frozen=True, slots=True)
class Collection:
    """One kind of document: a MongoDB collection, a SQLite table of the same name."""

    name: str
    fields: tuple[Field, ...]

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def columns(self) -> dict[str, Kind]:
        """The SQLite columns besides ``_id`` and ``extra``, with their kinds."""
        return {f.name: f.kind for f in self.fields if f.column}

    def named(self, kind: Kind) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.kind == kind)

    def listed(self) -> list[str]:
        """The columns of the CLI's table of these documents, in their order."""
        shown = sorted((f.listed, f.name) for f in self.fields if f.listed is not None)
        return [name for _, name in shown]


def _original(
    name: str, kind: Kind, *, usage: str | None = None, listed: int | None = None
) -> Field:
    return Field(name, kind, "original", usage=usage, listed=listed)


def _own(name: str, kind: Kind, *, usage: str | None = None, optional: bool = False) -> Field:
    return Field(name, kind, "burnmeter", usage=usage, optional=optional)


HOLDS_FIELD = "burnmeterHolds"
SETTLED_FIELD = "burnmeterSettled"

USER = Collection(
    "usersNew",
    (
        _original("_id", "text"),
        _original("isActive", "bool"),
        _original("role", "text"),
        _original("apiKey", "text"),
        # the original's two pools (docs/routing.md); a config may add pools of its own
        _original("credits", "money"),
        _original("refCredits", "money"),
        _original("creditsUsed", "money"),
        _original("creditsNew", "money"),
        _original("creditsNewUsed", "money"),
        _original("tokensUserNew", "int"),
        _original("totalInputTokens", "int"),
        _original("totalOutputTokens", "int"),
        _original("expiresAt", "date"),
        _original("expiresAtNew", "date"),
        _original("createdAt", "date"),
        # the original's dates burnmeter keeps but never reads
        _original("purchasedAt", "date"),
        _original("purchasedAtNew", "date"),
        _original("lastLoginAt", "date"),
        _original("apiKeyCreatedAt", "date"),
        # MongoDB only: SQLite keeps holds in a table of their own
        _own(HOLDS_FIELD, "object"),
        _own(SETTLED_FIELD, "object"),
    ),
)

KEY = Collection(
    "user_keys",
    (
        _original("_id", "text"),
        _original("name", "text"),
        _original("isActive", "bool"),
        _original("expiresAt", "date"),
        _original("tokensUsed", "int"),
        _original("requestsCount", "int"),
        _original("lastUsedAt", "date"),
        _own("createdAt", "date"),
    ),
)

REQUEST_LOG = Collection(
    "request_logs",
    (
        _own("_id", "text"),
        _original("userId", "text", listed=2),
        _original("userKeyId", "text"),
        _original("model", "text", listed=3),
        _original("inputTokens", "int", usage="input_tokens", listed=5),
        _original("outputTokens", "int", usage="output_tokens", listed=6),
        _original("cacheWriteTokens", "int", usage="cache_write_tokens"),
        _original("cacheHitTokens", "int", usage="cache_read_tokens"),
        _original("creditsCost", "money", listed=7),
        _original("creditType", "text", listed=4),
        _original("tokensUsed", "int"),
        _original("statusCode", "int", listed=8),
        _original("latencyMs", "int", listed=9),
        _original("isSuccess", "bool"),
        _original("createdAt", "date", listed=1),
        _own("reasoningTokens", "int", usage="reasoning_tokens"),
        _own("host", "text"),
        _own("upstream", "text"),
        _own("path", "text"),
        _own("stream", "bool"),
        _own("ttftMs", "int"),
        _own("usageSource", "text"),
        # the billed classes beyond the original's counts, so a cost can be recomputed
        _own("cacheWrite1hTokens", "int", usage="cache_write_1h_tokens", optional=True),
        _own("inputAudioTokens", "int", usage="input_audio_tokens", optional=True),
        _own("inputImageTokens", "int", usage="input_image_tokens", optional=True),
        _own("cacheAudioReadTokens", "int", usage="cache_audio_read_tokens", optional=True),
        _own("cacheImageReadTokens", "int", usage="cache_image_read_tokens", optional=True),
        _own("outputAudioTokens", "int", usage="output_audio_tokens", optional=True),
        _own("outputImageTokens", "int", usage="output_image_tokens", optional=True),
        _own("webSearchRequests", "int", usage="web_search_requests", optional=True),
        _own("codeExecutions", "int", usage="code_executions", optional=True),
        _own("serviceTier", "text", usage="service_tier", optional=True),
        _own("routeMultiplier", "text", optional=True),  # a decimal string
    ),
)

COLLECTIONS = (USER, KEY, REQUEST_LOG)
