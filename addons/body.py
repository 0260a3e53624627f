"""The request body: read once, as the stdlib reads it, refusing what two readers may read
differently; written back when admission changed it.

``decode_body`` answers with the JSON object or a ``Rejection``: not JSON, too deep or not an
object (400), a key given twice in any object at any depth, or two keys a lenient upstream
reads as one field (``AMBIGUOUS``). The answer of record is the stdlib's (``stdlib_object``:
``json.loads`` with a hook refusing a key given twice). orjson reads a body about three
times faster; its reading is taken only where it is provably the same value
(``orjson_object``): where orjson writes back what it read as the body is written, but for
whitespace. That is what JSON encoders write (JSON.stringify, httpx, ``json.dumps`` of
ASCII text or with ``ensure_ascii=False``), and then the body is read in some 60% of the
stdlib's time (40% for a compact one). Anything else (NaN, integers past 64 bits, lone
surrogates, escapes JSON does not require, other spellings of numbers) is read by the stdlib
alone, after orjson's try.

``encode_body`` writes a body back: orjson for what orjson read (its values are what orjson
writes as the stdlib would, in meaning), ``json.dumps`` for what only the stdlib could read
(orjson would write NaN as null, and refuses lone surrogates and integers past 64 bits).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
from mitmproxy import http

from addons import errors
from addons.exceptions import DuplicateKey
from addons.exceptions import Rejection


class OrjsonBody(dict[str, Any]):
    """A body orjson read (``orjson_object``): values orjson writes back faithfully, and so
    does anything admission adds to it (small integers, booleans, objects)."""


def decode_body(request: http.Request) -> dict[str, Any]:
    """The request's JSON object, each key read once; ``Rejection`` for anything else."""
    raw = request.content or b""
    fast = orjson_object(raw)
    body = fast if fast is not None else stdlib_object(raw)
    try:
        check_spellings(body)
    except DuplicateKey as e:
        raise Rejection(errors.AMBIGUOUS, str(e)) from None
    return body


def encode_body(body: dict[str, Any]) -> bytes:
    """``body`` as the JSON text to forward: what the upstream reads as the body admission
    decided on."""
    if isinstance(body, OrjsonBody):
        return orjson.dumps(body)
    return json.dumps(body).encode()


def orjson_object(raw: bytes) -> OrjsonBody | None:
    """The object ``raw`` holds as orjson reads it, where that is exactly what
    ``stdlib_object`` answers; None where it might not be (then ask the stdlib).

    The proof: orjson's writing of what it read must be, byte for byte, ``raw`` without its
    insignificant whitespace (``msgspec.json.format``, which keeps every token as written,
    every pair too, a key given twice included). Two equal compact texts have the same
    tokens, so the same pairs: orjson keeps one pair per key (the last), so no key was given
    twice, however spelt (``"a"`` and ``"\\u0061"`` are one key: not the same bytes). And
    where orjson reads a text at all, its values are the stdlib's (numbers correctly
    rounded by both, strings decoded alike) but for integers past 64 bits, which it reads as
    floats: written back with an exponent, not as the digits ``raw`` has. What orjson
    refuses (NaN, Infinity, numbers past the double range, lone surrogates, a byte order
    mark, UTF-16, more than 1024 levels) and what it cannot write back (more than 254
    levels: the stdlib reads some 1500) goes the stdlib's way, as does every body that is
    not an object, to be answered as the stdlib answers it.
    """
    try:
        value = orjson.loads(raw)
        written = orjson.dumps(value)
        if written != raw and written != msgspec.json.format(raw, indent=-1):
            return None
    except (orjson.JSONDecodeError, orjson.JSONEncodeError, msgspec.DecodeError):
        return None
    return OrjsonBody(value) if isinstance(value, dict) else None


def stdlib_object(raw: bytes) -> dict[str, Any]:
    """The object ``raw`` holds as ``json.loads`` reads it, refusing a key given twice at any
    depth: the reading of record (``Rejection``: AMBIGUOUS or BAD_REQUEST)."""
    try:
        body = json.loads(raw, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise Rejection(errors.AMBIGUOUS, str(e)) from None
    except (ValueError, RecursionError) as e:
        raise Rejection(errors.BAD_REQUEST, f"Request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise Rejection(errors.BAD_REQUEST, "Request body must be a JSON object")
    return body


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``' object hook: an object, refusing a key given twice (at any depth)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"Request body names {key!r} twice")
            seen.add(key)
    return obj


def spelling(key: str) -> str:
    """How a lenient decoder matches a key to a field: case-insensitively (Go's encoding/json,
    Unicode folding included) and camelCase = snake_case (protobuf's JSON mapping)."""
    return key.casefold().replace("_", "")


METERED_FIELDS = frozenset(
    {
        "model", "messages", "stream", "stream_options", "include_usage", "max_tokens",
        "max_completion_tokens", "max_output_tokens", "n", "background", "input",
        "instructions", "tools", "functions", "system", "cache_control", "contents",
        "systemInstruction", "system_instruction", "generationConfig", "generation_config",
        "maxOutputTokens", "candidateCount", "candidate_count", "requests", "content",
    }
)  # fmt: skip
"""Body fields the estimate and the price are read from, as their APIs spell them."""
_METERED_SPELLINGS = {spelling(name): name for name in METERED_FIELDS}


def check_spellings(body: dict[str, Any]) -> None:
    """No two keys of the body, or of one of its objects, that a lenient upstream reads as
    one field (``model`` and ``Model``, ``maxOutputTokens`` and ``max_output_tokens``), and
    no metered field spelt otherwise (``MAX_TOKENS`` would be a limit the hold never saw)."""
    for obj in [body, *(value for value in body.values() if isinstance(value, dict))]:
        spelt: dict[str, str] = {}
        for key in obj:
            other = spelt.setdefault(spelling(key), key)
            if other != key:
                raise DuplicateKey(f"Request body names {other!r} and {key!r}: one field")
            field_name = _METERED_SPELLINGS.get(spelling(key), key)
            if key not in METERED_FIELDS and field_name != key:
                raise DuplicateKey(f"Request body key {key!r}: spell it {field_name!r}")
