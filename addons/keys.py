"""Client API keys: where requests carry them, swapping in the upstream's, and a TTL cache.

Keys are read from ``Authorization: Bearer`` on every path, ``x-api-key`` on Anthropic
paths and ``x-goog-api-key`` or ``?key=`` on Gemini paths; every place is looked at on
every request, so that two different keys are refused rather than read one way here and
another way upstream. A client's key is never forwarded: it is a burnmeter secret,
replaced by the route's upstream key (if any).

The key cache holds no raw key: it is keyed by the key's SHA-256 digest, so neither a
memory dump nor a timing difference in the look-up says anything about the keys it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Iterable
from urllib.parse import unquote

from mitmproxy import http

from addons.errors import Style
from addons.exceptions import ConflictingKeys
from burnmeter.documents import HASHED_PREFIX
from burnmeter.documents import KEY_PREFIX
from burnmeter.documents import hash_key
from burnmeter.store.base import KeyOwner

CLIENT_KEY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
KEY_PARAM = "key"
"""Gemini's query parameter for a key, compared decoded and case-folded (``?%6BEY=``)."""
ACCEPTED: dict[Style, frozenset[str]] = {
    "openai": frozenset({"authorization"}),
    "anthropic": frozenset({"authorization", "x-api-key"}),
    "gemini": frozenset({"authorization", "x-goog-api-key", KEY_PARAM}),
}
"""Where each API's clients may put their key."""

Query = Iterable[tuple[str, str | None]]
MIN_SEARCHED_KEY = 16
"""Keys shorter than this (a legacy key can be) are not looked for inside other values:
they would match by chance."""


def searchable(key: str | None) -> bool:
    """A key long enough to be looked for inside other values (paths, headers, bodies)."""
    return key is not None and len(key) >= MIN_SEARCHED_KEY


def presented_keys(request: http.Request, query: Query | None = None) -> list[tuple[str, str]]:
    """(place, key) for every place a key can be: each key header, duplicates included (in
    any case), and every query parameter that decodes to ``key`` in any case."""
    found: list[tuple[str, str]] = []
    headers = request.headers
    for value in headers.get_all("authorization"):
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            found.append(("authorization", token.strip()))
    for name in CLIENT_KEY_HEADERS[1:]:
        found += [(name, value.strip()) for value in headers.get_all(name) if value.strip()]
    pairs = request.query.items(multi=True) if query is None else query
    found += [(KEY_PARAM, v) for name, v in pairs if name.casefold() == KEY_PARAM and v]
    return found


def client_key(request: http.Request, style: Style, query: Query | None = None) -> str | None:
    """The key the client authenticated with, or None; ``query``: the decoded query pairs.

    Raises ``ConflictingKeys`` if two places hold different keys. A stored key hash
    (``sha256:...``, what ``user_keys._id`` holds for keys burnmeter made) is never a key:
    whoever can read the database must not be able to use what it holds.
    """
    found = presented_keys(request, query)
    if len({key for _, key in found}) > 1:
        raise ConflictingKeys("The request carries more than one API key")
    accepted = [key for place, key in found if place in ACCEPTED[style]]
    if not accepted or accepted[0].startswith(HASHED_PREFIX):
        return None
    return accepted[0]


def holds_key(value: str, key: str | None) -> bool:
    """``value`` holds ``key`` (if long enough to look for) or anything shaped like a key
    burnmeter makes: another user's key in ``api-key`` or a cookie is a burnmeter secret
    too, whether or not this request authenticated with it."""
    plain = unquote(value).lower()
    return KEY_PREFIX in plain or (searchable(key) and str(key).lower() in plain)


def drop_client_key(request: http.Request, key: str | None = None) -> None:
    """Remove every place a client key can be: the key headers (every copy), Gemini's
    ``key`` parameter however it is spelt, and any other header or query parameter that
    holds ``key`` or a burnmeter key (the upstream and mitmproxy's flow printout see both)."""
    headers = request.headers
    for name in CLIENT_KEY_HEADERS:
        if name in headers:
            del headers[name]
    for name in {name for name, value in headers.items(multi=True) if holds_key(value, key)}:
        del headers[name]
    if "?" not in request.path:
        return
    pairs = request.query.items(multi=True)
    kept = [
        (name, value)
        for name, value in pairs
        if name.casefold() != KEY_PARAM and not holds_key(value, key)
    ]
    if len(kept) != len(pairs):
        request.query = kept


def set_upstream_key(
    request: http.Request, style: Style, key: str | None, client: str | None = None
) -> None:
    """Drop the client's credentials (``client``: its key) and, if the route has one, add
    the upstream's key."""
    drop_client_key(request, client)
    if key is None:
        return
    match style:
        case "anthropic":
            request.headers["x-api-key"] = key
        case "gemini":
            request.headers["x-goog-api-key"] = key
        case "openai":
            request.headers["authorization"] = f"Bearer {key}"


class KeyCache:
    """Look-ups of the store's ``find_key``, unknown keys included, kept ``ttl`` seconds.

    A revoked key or disabled user therefore stops working within ``ttl``. At most
    ``max_entries`` keys are kept (oldest dropped first), so random keys cannot grow it.
    Entries are keyed by ``hash_key``: never the key itself.
    """

    def __init__(
        self, ttl: int, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, tuple[float, KeyOwner | None]] = {}

    def get(self, key: str) -> tuple[bool, KeyOwner | None]:
        """(found, owner): ``found`` is False when the store must be asked."""
        digest = hash_key(key)
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
        digest = hash_key(key)
        self._entries.pop(digest, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[digest] = (self.clock() + self.ttl, owner)
