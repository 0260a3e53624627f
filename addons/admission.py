"""Admission: who is calling, which pool pays, and an atomic hold before forwarding.

``authenticate`` runs in ``requestheaders`` (key, route); ``admit`` runs in ``request``
once the body is there (size, JSON, estimate, price, expiry, hold). Both raise
``Rejection`` for anything that must be answered locally. Store calls never run on the
event loop: key look-ups on a small thread pool, holds on the ``HoldQueue`` thread (many
to a transaction); both are given up after ``STORE_TIMEOUT``.

Store outage: a failed or slow store call marks the store down for ``STORE_RETRY``
seconds, and so does a writer whose settlements are not getting through; meanwhile
admission does not wait for the store. Keys that were in the key cache are
still served, admitted without a hold if their cached balance covers it (the settlement
then charges the balance directly, once, by request id, when the writer reaches the
store); other keys get 503, even if a look-up could still read them. New
metered requests also get 503 once the journal could not take one settlement more for
each request in flight: the journal never has to refuse a finished request; and while a
journal write fails (a full disk, an I/O error) until a probe write succeeds again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from decimal import Decimal
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import url

from addons import errors
from addons.canonical import CanonicalRequest
from addons.errors import Style
from addons.exceptions import ConflictingKeys
from addons.exceptions import DuplicateKey
from addons.exceptions import Rejection
from addons.holding import HoldQueue
from addons.keys import KeyCache
from addons.keys import Query
from addons.keys import client_key
from addons.keys import searchable
from addons.outputcap import cap_output
from addons.ratelimit import RateLimiter
from addons.streamtap import StreamTap
from burnmeter.config import Config
from burnmeter.config import Pool
from burnmeter.config import Route
from burnmeter.documents import hash_key
from burnmeter.documents import mask_key
from burnmeter.documents import utcnow
from burnmeter.estimate import RequestEstimate
from burnmeter.estimate import estimate_request
from burnmeter.estimate import hold_amounts
from burnmeter.estimate import output_tokens_paid
from burnmeter.exceptions import StoreError
from burnmeter.exceptions import UnknownModelError
from burnmeter.money import amount_of
from burnmeter.pricing import PriceQuote
from burnmeter.pricing import resolve_price
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Store
from burnmeter.store.rules import split_hold
from burnmeter.writer import SettlementWriter

logger = logging.getLogger(__name__)

CREDITS_EXPIRED_MESSAGE = "Credits have expired. Please purchase new credits."
STORE_TIMEOUT = 1.0
"""Seconds admission waits for one store call (key look-up, hold)."""
STORE_RETRY = 2.0
"""Seconds a failed store call marks the store down for admission."""
RECORD_RESERVE = 4096
"""Journal bytes kept free for each request in flight (a record is about 1 KiB)."""


@dataclass(slots=True)
class Ticket:
    """What admission learned about one request; settlement and inspection read it."""

    api: str | None
    """The metered API, or None for a path that is passed through uncharged."""
    style: Style
    path: str
    host: str
    """The client-facing host and port, as ``addons.canonical`` reads them."""
    upstream: str
    owner: KeyOwner
    key_mask: str
    route: Route
    pool: str
    request: CanonicalRequest
    client_key: str = field(default="", repr=False)
    """The client's key, until admission is done: to strip it wherever the request holds it
    and to refuse a body that holds it."""
    model: str | None = None
    quote: PriceQuote | None = None
    estimate: RequestEstimate | None = None
    key_cached: bool = False
    """The key was in the key cache: it may be admitted without a hold in an outage."""
    hold: Hold | None = None
    output_tokens_paid: int | None = None
    """The output limit per choice the request was forwarded with (``cap_output_tokens``)."""
    admitted: bool = False
    """Forwarded and metered; with ``hold`` None the store was down (a hold-less admission)."""
    tap: StreamTap | None = None

    @property
    def user_id(self) -> str:
        return self.owner.user_id

    @property
    def stream(self) -> bool:
        return self.estimate is not None and self.estimate.stream


def model_of(request: CanonicalRequest, body: dict[str, Any]) -> str:
    """The requested model: the body's ``model``, or on Gemini the path's."""
    assert request.api is not None
    if request.api.startswith("gemini."):
        model: object = request.model_in_path
    else:
        model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Rejection(errors.BAD_REQUEST, "'model' is required and must be a string")
    if not model.strip().isprintable():  # controls, lone surrogates: no upstream's model
        raise Rejection(errors.BAD_REQUEST, "'model' must be printable text")
    return model


def check_owner(owner: KeyOwner | None, now: datetime) -> KeyOwner:
    if owner is None:
        raise Rejection(errors.INVALID_KEY, "Invalid API key")
    if not owner.key_active or owner.user.get("isActive", True) is False:
        raise Rejection(errors.REVOKED_KEY, "API key has been revoked")
    if owner.key_expires_at is not None and owner.key_expires_at <= now:
        # as the original answered (docs/documents.md, user_keys.expiresAt): its keys expire with the credits they were sold with
        raise Rejection(errors.CREDITS_EXPIRED, CREDITS_EXPIRED_MESSAGE)
    return owner


class Admission:
    def __init__(
        self,
        config: Config,
        store: Store,
        cache: KeyCache,
        writer: SettlementWriter,
        executor: ThreadPoolExecutor,
        limiter: RateLimiter | None = None,
        in_flight: Callable[[], int] = lambda: 0,
    ) -> None:
        self.config = config
        self.store = store
        self.cache = cache
        self.writer = writer
        self.executor = executor
        self.limiter = limiter or RateLimiter()
        self.in_flight = in_flight
        """Requests admitted and not yet settled (each needs room for its journal record)."""
        self._down_until = 0.0
        self._calls: set[Future[Any]] = set()
        self.holds = HoldQueue(store, self._give_back)

    @property
    def store_down(self) -> bool:
        return time.monotonic() < self._down_until or self.writer.stalled(STORE_TIMEOUT)

    def _mark_down(self, error: Exception) -> None:
        if not self.store_down:
            logger.warning("metering: store unavailable for admission: %s", error)
        self._down_until = time.monotonic() + STORE_RETRY

    async def _store_call[T](self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``'s answer; ``StoreError`` if it fails or takes over ``STORE_TIMEOUT``."""
        if self.store_down:
            raise StoreError("store marked down after a failed call")
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                return await call()
        except TimeoutError:
            error = StoreError(f"no answer within {STORE_TIMEOUT}s")
        except StoreError as e:
            error = e
        self._mark_down(error)
        raise error

    def _in_thread[T](self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` on the store threads."""
        future = self.executor.submit(fn, *args)
        self._calls.add(future)
        future.add_done_callback(self._calls.discard)
        return asyncio.wrap_future(future)

    def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the store calls under way (shutdown)."""
        self.holds.drain(timeout)
        wait(list(self._calls), timeout)

    def close(self, timeout: float) -> None:
        self.holds.stop(timeout)

    def _give_back(self, hold: Hold) -> None:
        """A hold made after admission stopped waiting: nothing will settle it, give it back.

        Settling and releasing are both idempotent per request id, so the release is right
        whether it runs before or after the request's (hold-less) settlement."""
        try:
            self.executor.submit(self._release, hold)
        except RuntimeError:  # shutting down: the hold sweep releases it
            pass

    def _release(self, hold: Hold) -> None:
        try:
            self.store.release(hold)
        except StoreError as e:
            logger.warning("metering: late hold %s left to the sweep: %s", hold.request_id, e)

    async def identify(
        self, request: http.Request, style: Style, query: Query | None = None
    ) -> tuple[str, KeyOwner, bool]:
        """The client's key, its (checked) owner, and whether the key cache knew it
        (``query``: the decoded query pairs of the canonical request)."""
        try:
            key = client_key(request, style, query)
        except ConflictingKeys as e:
            raise Rejection(errors.AMBIGUOUS, str(e)) from None
        if key is None:
            raise Rejection(errors.MISSING_KEY, "Missing API key (Authorization: Bearer KEY)")
        if not key.isascii():  # no API issues such keys; hashing or querying one would raise
            raise Rejection(errors.INVALID_KEY, "Invalid API key")
        found, owner = self.cache.get(key)
        if not found:
            try:
                owner = await self._store_call(lambda: self._in_thread(self.store.find_key, key))
            except StoreError as e:
                raise Rejection(errors.UNAVAILABLE, "Metering store unavailable") from e
            self.cache.put(key, owner)
        return key, check_owner(owner, utcnow()), found

    async def authenticate(self, flow: http.HTTPFlow, canonical: CanonicalRequest) -> Ticket:
        """Who calls (``canonical``: the request as read once) and which route bills it."""
        request = flow.request
        route = self.config.route(canonical.host, canonical.port, flow.client_conn.sockname[1])
        if route is None:
            # billing it at some default would undercharge every route
            raise Rejection(
                errors.UNKNOWN_HOST,
                f"Host {canonical.authority or '(none)'!r} is not served by this gateway",
            )
        key, owner, found = await self.identify(request, canonical.style, canonical.query)
        if searchable(key) and key in canonical.path:
            raise Rejection(errors.AMBIGUOUS, "The request path must not hold the API key")
        if canonical.api is None and not canonical.free:
            # Anything else would go out on the operator's upstream key, unmetered.
            raise Rejection(
                errors.UNSUPPORTED,
                f"{canonical.method} {canonical.path} is not served by this gateway",
            )
        self.check_rate(key, route)
        return Ticket(
            api=canonical.api,
            style=canonical.style,
            path=canonical.path,
            host=canonical.authority,
            upstream=url.hostport(request.scheme, request.host, request.port),
            owner=owner,
            key_mask=mask_key(key),
            route=route,
            pool=route.pool,
            request=canonical,
            client_key=key,
            key_cached=found,
        )

    def check_rate(self, key: str, route: Route | None) -> None:
        """429 past the key's requests per minute: the route's own limit, else the global one
        (``route`` None: a request no route bills, such as the usage endpoint's).

        A route with its own limit has its own budget; the others share one per key."""
        if route is not None and route.rate_limit_rpm is not None:
            limit, scope = route.rate_limit_rpm, f"{route.host or route.listen_port or '*'}"
        elif self.config.rate_limit_rpm is not None:
            limit, scope = self.config.rate_limit_rpm, ""
        else:
            return
        budget = hash_key(f"{scope}\0{key}")  # no raw key kept
        delay = self.limiter.check(budget, limit)
        if delay is not None:
            after = RateLimiter.retry_after(delay)
            raise Rejection(
                errors.RATE_LIMITED,
                f"Rate limit of {limit} requests per minute reached; retry after {after}s",
                headers={"Retry-After": after},
            )

    def check_size(self, size: int) -> None:
        if size > self.config.max_request_bytes:
            raise Rejection(
                errors.TOO_LARGE,
                f"Request body of {size} bytes exceeds the limit of "
                f"{self.config.max_request_bytes} bytes",
            )

    async def admit(self, flow: http.HTTPFlow, ticket: Ticket) -> None:
        """Price the request and hold its estimated maximum; rewrites stream requests."""
        assert ticket.api is not None
        request = flow.request
        self.check_size(len(request.raw_content or b""))
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # decoding is unbounded: a small gzip body could inflate to gigabytes
            raise Rejection(
                errors.COMPRESSED_BODY,
                f"Content-Encoding {encoding!r} is not supported on requests: send it uncompressed",
            )
        key = ticket.client_key
        if searchable(key) and key.encode() in (request.raw_content or b""):
            raise Rejection(errors.AMBIGUOUS, "The request body must not hold the API key")
        body = self._json_body(request)
        if ticket.api == "openai.responses" and body.get("background") is True:
            # its output is fetched later (GET /v1/responses/ID): it could not be metered
            raise Rejection(errors.BAD_REQUEST, "Background responses are not supported")
        ticket.model = model_of(ticket.request, body)
        try:
            ticket.estimate = estimate_request(
                ticket.api, body, self.config, ticket.path, ticket.model
            )
        except (ValueError, RecursionError) as e:
            raise Rejection(errors.BAD_REQUEST, str(e)) from e
        try:
            ticket.quote = resolve_price(
                self.config, ticket.model, ticket.route.multiplier, upstream_url=request.url
            )
        except UnknownModelError as e:
            raise Rejection(errors.UNKNOWN_MODEL, str(e)) from e
        ticket.pool = ticket.quote.pool or ticket.pool
        frame_body(request)
        rewritten = ticket.estimate.stream and prepare_stream(request, ticket.api, body)
        pool = self.config.pools[ticket.pool]
        expires = ticket.owner.user.get(pool.expires) if pool.expires else None
        if isinstance(expires, datetime) and expires <= utcnow():
            raise Rejection(errors.CREDITS_EXPIRED, CREDITS_EXPIRED_MESSAGE)
        if not self.writer.journal.probe():
            # its settlement could not be journaled: refuse rather than serve it uncharged
            raise Rejection(errors.UNAVAILABLE, "Metering journal cannot be written, retry later")
        if not self.journal_has_room():
            raise Rejection(
                errors.UNAVAILABLE, "Metering store unreachable and journal full, retry later"
            )
        maximum, minimum = hold_amounts(ticket.estimate, ticket.quote)
        wanted = HoldRequest(flow.id, ticket.user_id, pool, maximum, minimum)
        try:
            hold: Hold | InsufficientBalance | None = await self._store_call(
                lambda: self.holds.hold(wanted)
            )
        except StoreError as e:
            if not ticket.key_cached:
                raise Rejection(errors.UNAVAILABLE, "Metering store unavailable") from e
            hold = holdless(ticket.owner, pool, maximum, minimum)
        if isinstance(hold, InsufficientBalance):
            raise Rejection(
                errors.INSUFFICIENT_CREDITS,
                f"Insufficient credits. Current balance: ${hold.balance:.2f}",
                balance=float(hold.balance),
            )
        ticket.hold = hold
        if self.config.cap_output_tokens:
            # the hold taken decides: a balance that covered only part of it pays for less
            held = hold.amount if hold is not None else maximum
            paid = output_tokens_paid(ticket.estimate, ticket.quote, held, maximum)
            ticket.output_tokens_paid = paid
            rewritten = cap_output(ticket.api, body, paid) or rewritten
        if rewritten:
            request.set_content(json.dumps(body).encode())
        ticket.admitted = True

    def journal_has_room(self) -> bool:
        """Room for one more record per request in flight, this one included."""
        journal = self.writer.journal
        reserve = (self.in_flight() + 1) * RECORD_RESERVE
        return journal.size + reserve <= journal.max_bytes

    @staticmethod
    def _json_body(request: http.Request) -> dict[str, Any]:
        try:
            body = json.loads(request.content or b"", object_pairs_hook=unique_keys)
        except DuplicateKey as e:
            raise Rejection(errors.AMBIGUOUS, str(e)) from None
        except (ValueError, RecursionError) as e:
            raise Rejection(errors.BAD_REQUEST, f"Request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise Rejection(errors.BAD_REQUEST, "Request body must be a JSON object")
        try:
            check_spellings(body)
        except DuplicateKey as e:
            raise Rejection(errors.AMBIGUOUS, str(e)) from None
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


def holdless(
    owner: KeyOwner, pool: Pool, maximum: Decimal, minimum: Decimal
) -> InsufficientBalance | None:
    """Admission while the store is down: the cached balance (as of the key look-up) must
    cover what a hold would have; None admits without a hold."""
    balances = {name: amount_of(owner.user.get(name)) for name in pool.balance}
    if split_hold(balances, maximum, minimum) is None:
        return InsufficientBalance(sum(balances.values(), Decimal(0)))
    return None


def frame_body(request: http.Request) -> None:
    """Give the body a ``content-length``: HTTP/2 and 3 clients may leave it out, and
    mitmproxy passes their headers as they are to an HTTP/1 upstream, which then reads the
    body as the next request."""
    headers = request.headers
    if "content-length" not in headers and "transfer-encoding" not in headers:
        headers["content-length"] = str(len(request.raw_content or b""))


def prepare_stream(request: http.Request, api: str, body: dict[str, Any]) -> bool:
    """Ask for an uncompressed stream that reports its usage; True if ``body`` changed.

    OpenAI chat streams carry usage only with ``stream_options.include_usage``; with it the
    client gets one extra final chunk (``choices: []``).
    """
    request.headers["accept-encoding"] = "identity"
    if api != "openai.chat":
        return False
    options = body.get("stream_options")
    if options is None:
        options = body["stream_options"] = {}
    if not isinstance(options, dict):
        raise Rejection(errors.BAD_REQUEST, "'stream_options' must be an object")
    if options.get("include_usage") is not True:
        options["include_usage"] = True
        return True
    return False
