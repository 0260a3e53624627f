"""Strings made safe to write: every journal record and document goes through here.

Client- and upstream-controlled strings (Host, path, model names) reach mitmproxy's
hooks as ``str`` that may hold lone surrogates (bytes that were not UTF-8, decoded with
``surrogateescape``, or a JSON ``"\\ud800"`` escape) and may be of any length. UTF-8
encoders (the journal, SQLite, BSON) raise on a surrogate, and a settlement that cannot
be encoded is a request nobody is charged for. So what is written is valid UTF-8 (each
unencodable character becomes U+FFFD) and, for the request log's free-text fields,
bounded in length.
"""

from __future__ import annotations

from typing import Any

MAX_TEXT = 1024
"""Characters kept of a client-controlled field of the request log (host, path, model)."""
REPLACEMENT = "\ufffd"


def encodable(value: str) -> str:
    """``value`` with every character UTF-8 cannot encode (a lone surrogate) replaced."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


def bounded(value: str, limit: int = MAX_TEXT) -> str:
    """An encodable ``value`` of at most ``limit`` characters (the cut marked with …)."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return encodable(value)


def encodable_tree(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, scalars) with every string, keys included,
    made encodable; other values as they are."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, dict):
        return {encodable_tree(k): encodable_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encodable_tree(v) for v in value]
    return value
