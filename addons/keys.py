"""Client API keys: where requests carry them, swapping in the upstream's, and a TTL cache.

Keys are read from ``Authorization: Bearer`` on every path, ``x-api-key`` on Anthropic
paths and ``x-goog-api-key`` or ``?key=`` on Gemini paths. A client's key is never
forwarded: it is a burnmeter secret, replaced by the route's upstream key (if any).

The key cache holds no raw key: it is keyed by the key's SHA-256 digest, so neither a
memory dump nor a timing difference in the look-up says anything about the keys it holds.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

from mitmproxy import http

from addons.errors import Style
from burnmeter.documents import HASHED_PREFIX
from burnmeter.store.base import KeyOwner

CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")


def client_key(request: http.Request, style: Style) -> str | None:
    """The key the client authenticated with, or None.

    A stored key hash (``sha256:...``, what ``user_keys._id`` holds for keys burnmeter made)
    is never a key: whoever can read the database must not be able to use what it holds.
    """
    key = _presented_key(request, style)
    if key is None or key.startswith(HASHED_PREFIX):
        return None
    return key


def _presented_key(request: http.Request, style: Style) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if style == "anthropic":
        return request.headers.get("x-api-key", "").strip() or None
    if style == "gemini":
        return (request.headers.get("x-goog-api-key") or request.query.get("key", "")) or None
    return None


def drop_client_key(request: http.Request) -> None:
    """Remove every place a client key can be (headers and Gemini's ``?key=``)."""
    present = {name.lower() for name, _ in request.headers.fields}  # one scan, not one a name
    for name in CLIENT_KEY_HEADERS:
        if name.encode() in present:
            del request.headers[name]
    if "key=" in request.path and "key" in request.query:  # parsing the query is not free
        request.query.pop("key")


def set_upstream_key(request: http.Request, style: Style, key: str | None) -> None:
    """Drop the client's credentials and, if the route has one, add the upstream's key."""
    drop_client_key(request)
    if key is None:
        return
    match style:
        case "anthropic":
            request.headers["x-api-key"] = key
        case "gemini":
            request.headers["x-goog-api-key"] = key
        case "openai":
            request.headers["authorization"] = f"Bearer {key}"


def key_digest(key: str) -> bytes:
    """What the cache is keyed by: never the key itself."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyCache:
    """Look-ups of the store's ``find_key``, unknown keys included, kept ``ttl`` seconds.

    A revoked key or disabled user therefore stops working within ``ttl``. At most
    ``max_entries`` keys are kept (oldest dropped first), so random keys cannot grow it.
    Entries are keyed by ``key_digest``.
    """

    def __init__(
        self, ttl: int, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[bytes, tuple[float, KeyOwner | None]] = {}

    def get(self, key: str) -> tuple[bool, KeyOwner | None]:
        """(found, owner): ``found`` is False when the store must be asked."""
        digest = key_digest(key)
        entry = self._entries.get(digest)
        if entry is None:
            return False, None
        if entry[0] <= self.clock():
            del self._entries[digest]
            return False, None
        return True, entry[1]

    def put(self, key: str, owner: KeyOwner | None) -> None:
        if self.ttl <= 0:
            return
        digest = key_digest(key)
        self._entries.pop(digest, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (self.clock() + self.ttl, owner)

    def clear(self) -> None:
        self._entries.clear()
