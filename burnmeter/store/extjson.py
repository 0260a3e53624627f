"""Values between Python, MongoDB Extended JSON (mongoexport, SQLite ``extra``) and BSON.

In documents, dates are aware UTC ``datetime`` truncated to milliseconds (BSON's
resolution, kept by both backends), non-money decimals are ``Decimal`` and ObjectIds stay
``ObjectId``.
"""

from __future__ import annotations

import json
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from typing import Any

from bson import json_util
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_OPTIONS = json_util.JSONOptions(tz_aware=True, tzinfo=UTC)


def utc(value: datetime) -> datetime:
    """Naive datetimes are UTC (as pymongo takes them)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def to_ms(value: datetime) -> int:
    return (utc(value) - EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def python(value: Any) -> Any:
    """Extended JSON wrappers (``{"$date": ...}``), BSON types and naive dates → document values."""
    if isinstance(value, dict):
        return _scalar(json_util.object_hook({k: python(v) for k, v in value.items()}, _OPTIONS))
    if isinstance(value, list):
        return [python(v) for v in value]
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc(value)
    if isinstance(value, Decimal128):
        return value.to_decimal()
    return value


def _tag(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$date": to_ms(value)}
    if isinstance(value, Decimal):
        return {"$numberDecimal": str(value)}
    if isinstance(value, ObjectId):
        return {"$oid": str(value)}
    raise TypeError(f"cannot store a {type(value).__name__}")


def dumps(value: Any) -> str:
    """Extended JSON text that ``loads`` turns back into the same values."""
    return json.dumps(value, default=_tag, separators=(",", ":"))


def loads(text: str) -> Any:
    return python(json.loads(text))
