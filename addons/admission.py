"""Admission: who is calling, which pool pays, and an atomic hold before forwarding.

``authenticate`` runs in ``requestheaders`` (key, route): an ``Authenticated`` phase, and
the client's key apart from it. In ``request``, once the body is there, ``price`` reads it
(size, JSON, model, estimate, price: the ``Quoted`` phase) and ``admit`` holds the
estimated maximum (the ``Admitted`` phase; ``addons/phases.py``). Each raises ``Rejection``
for anything that must be answered locally. Store calls never run on the event loop: key
look-ups on a small thread pool, holds on the ``HoldQueue`` thread (many to a
transaction); both are given up after ``STORE_TIMEOUT``.

Store outage (``addons/outage.py`` knows whether there is one): while the store is marked
down, admission does not wait for it. Keys that were in the key cache are still served,
admitted without a hold if their cached balance covers it (the settlement then charges
the balance directly, once, by request id, when the writer reaches the store); other keys
get 503, even if a look-up could still read them. New metered requests also get 503 while
the journal could not take their settlement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import url

from addons import errors
from addons import phases
from addons.body import decode_body
from addons.body import encode_body
from addons.canonical import CanonicalRequest
from addons.errors import Style
from addons.exceptions import ConflictingKeys
from addons.exceptions import Rejection
from addons.holding import HoldQueue
from addons.keys import KeyCache
from addons.keys import Query
from addons.keys import client_key
from addons.keys import searchable
from addons.outage import STORE_TIMEOUT
from addons.outage import Outage
from addons.outputcap import cap_output
from addons.phases import Admitted
from addons.phases import Authenticated
from addons.phases import Quoted
from addons.ratelimit import RateLimiter
from burnmeter.config import Config
from burnmeter.config import Pool
from burnmeter.config import Route
from burnmeter.documents import hash_key
from burnmeter.documents import mask_key
from burnmeter.documents import utcnow
from burnmeter.estimate import estimate_request
from burnmeter.estimate import hold_amounts
from burnmeter.estimate import output_tokens_paid
from burnmeter.exceptions import StoreError
from burnmeter.exceptions import UnknownModelError
from burnmeter.money import amount_of
from burnmeter.pricing import resolve_price
from burnmeter.store.base import Hold
from burnmeter.store.base import HoldRequest
from burnmeter.store.base import InsufficientBalance
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Store
from burnmeter.store.rules import split_hold

logger = logging.getLogger(__name__)

CREDITS_EXPIRED_MESSAGE = "Credits have expired. Please purchase new credits."


@dataclass(frozen=True, slots=True)
class Admitting:
    """A priced request on its way to its hold, for the one ``request`` hook: its phase,
    and its body as decoded (admission edits it once the hold says what it pays for)."""

    quoted: Quoted
    body: dict[str, Any]


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


def authenticated(
    request: http.Request,
    canonical: CanonicalRequest,
    route: Route,
    owner: KeyOwner,
    key: str,
    *,
    key_cached: bool,
) -> Authenticated:
    """The authentication phase of a request whose ``owner`` holds ``key`` (kept masked only)."""
    return Authenticated(
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
        key_cached=key_cached,
    )


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
        outage: Outage,
        executor: ThreadPoolExecutor,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.cache = cache
        self.outage = outage
        self.executor = executor
        self.limiter = limiter or RateLimiter()
        self._calls: set[Future[Any]] = set()
        self.holds = HoldQueue(store, self._give_back)

    async def _store_call[T](self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``'s answer; ``StoreError`` if it fails or takes over ``STORE_TIMEOUT``."""
        if self.outage.store_down:
            raise StoreError("store marked down after a failed call")
        try:
            async with asyncio.timeout(STORE_TIMEOUT):
                return await call()
        except TimeoutError:
            error = StoreError(f"no answer within {STORE_TIMEOUT}s")
        except StoreError as e:
            error = e
        self.outage.mark_down(error)
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

    async def authenticate(
        self, flow: http.HTTPFlow, canonical: CanonicalRequest
    ) -> tuple[Authenticated, str]:
        """Who calls (``canonical``: the request as read once) and which route bills it; and
        the client's key, which the caller keeps until admission is done (to strip it from
        the request and to refuse a body that holds it), and which no phase holds."""
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
        return authenticated(request, canonical, route, owner, key, key_cached=found), key

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

    def price(self, flow: http.HTTPFlow, authenticated: Authenticated, key: str) -> Admitting:
        """Read the body (``key``: the client's, which it must not hold) and price the
        request: its ``Quoted`` phase."""
        api = authenticated.api
        assert api is not None, "a request passed through uncharged is never priced"
        request = flow.request
        self.check_size(len(request.raw_content or b""))
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # decoding is unbounded: a small gzip body could inflate to gigabytes
            raise Rejection(
                errors.COMPRESSED_BODY,
                f"Content-Encoding {encoding!r} is not supported on requests: send it uncompressed",
            )
        if searchable(key) and key.encode() in (request.raw_content or b""):
            raise Rejection(errors.AMBIGUOUS, "The request body must not hold the API key")
        body = decode_body(request)
        if api == "openai.responses" and body.get("background") is True:
            # its output is fetched later (GET /v1/responses/ID): it could not be metered
            raise Rejection(errors.BAD_REQUEST, "Background responses are not supported")
        model = model_of(authenticated.request, body)
        try:
            estimate = estimate_request(api, body, self.config, authenticated.path, model)
        except (ValueError, RecursionError) as e:
            raise Rejection(errors.BAD_REQUEST, str(e)) from e
        try:
            quote = resolve_price(
                self.config, model, authenticated.route.multiplier, upstream_url=request.url
            )
        except UnknownModelError as e:
            raise Rejection(errors.UNKNOWN_MODEL, str(e)) from e
        return Admitting(phases.quoted(authenticated, api, model, estimate, quote), body)

    async def admit(self, flow: http.HTTPFlow, admitting: Admitting) -> Admitted:
        """Hold the priced request's estimated maximum; rewrites stream requests."""
        quoted, body = admitting.quoted, admitting.body
        request = flow.request
        frame_body(request)
        rewritten = quoted.stream and prepare_stream(request, quoted.api, body)
        pool = self.config.pools[quoted.pool]
        expires = quoted.owner.user.get(pool.expires) if pool.expires else None
        if isinstance(expires, datetime) and expires <= utcnow():
            raise Rejection(errors.CREDITS_EXPIRED, CREDITS_EXPIRED_MESSAGE)
        if (refusal := self.outage.refusal()) is not None:
            raise refusal
        maximum, minimum = hold_amounts(quoted.estimate, quoted.quote)
        wanted = HoldRequest(flow.id, quoted.user_id, pool, maximum, minimum)
        try:
            hold: Hold | InsufficientBalance | None = await self._store_call(
                lambda: self.holds.hold(wanted)
            )
        except StoreError as e:
            if not quoted.key_cached:
                raise Rejection(errors.UNAVAILABLE, "Metering store unavailable") from e
            hold = holdless(quoted.owner, pool, maximum, minimum)
        if isinstance(hold, InsufficientBalance):
            raise Rejection(
                errors.INSUFFICIENT_CREDITS,
                f"Insufficient credits. Current balance: ${hold.balance:.2f}",
                balance=float(hold.balance),
            )
        paid = None
        if self.config.cap_output_tokens:
            # the hold taken decides: a balance that covered only part of it pays for less
            held = hold.amount if hold is not None else maximum
            paid = output_tokens_paid(quoted.estimate, quoted.quote, held, maximum)
            rewritten = cap_output(quoted.api, body, paid) or rewritten
        if rewritten:
            request.set_content(encode_body(body))
        return phases.admitted(quoted, hold, paid)


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
