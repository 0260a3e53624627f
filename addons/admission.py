"""Admission: who is calling, which pool pays, and an atomic hold before forwarding.

``authenticate`` runs in ``requestheaders`` (key, route); ``admit`` runs in ``request``
once the body is there (size, JSON, estimate, price, expiry, hold). Both raise
``Rejection`` for anything that must be answered locally. Store calls run on a small
dedicated thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import url

from addons import errors
from addons.errors import Problem
from addons.errors import Style
from addons.keys import KeyCache
from addons.keys import client_key
from addons.settlement import SettlementWriter
from addons.streamtap import StreamTap
from burnmeter.config import Config
from burnmeter.config import Route
from burnmeter.documents import mask_key
from burnmeter.documents import utcnow
from burnmeter.estimate import RequestEstimate
from burnmeter.estimate import estimate_request
from burnmeter.estimate import hold_amounts
from burnmeter.pricing import PriceQuote
from burnmeter.pricing import UnknownModelError
from burnmeter.pricing import resolve_price
from burnmeter.store.base import Hold
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Refusal
from burnmeter.store.base import Store
from burnmeter.store.base import StoreError
from burnmeter.usage import api_for

GEMINI_MODEL = re.compile(r"/(?:tunedModels|models)/([^/:]+):")


class Rejection(Exception):
    """A request answered locally with ``problem``; ``extra`` joins OpenAI's error object."""

    def __init__(self, problem: Problem, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message
        self.extra = extra


@dataclass(slots=True)
class Ticket:
    """What admission learned about one request; settlement and inspection read it."""

    api: str | None
    """The metered API, or None for a path that is passed through uncharged."""
    style: Style
    path: str
    host: str
    """The client-facing host (Host header), as the client sent it."""
    upstream: str
    owner: KeyOwner
    key_mask: str
    route: Route | None
    pool: str
    model: str | None = None
    quote: PriceQuote | None = None
    estimate: RequestEstimate | None = None
    hold: Hold | None = None
    tap: StreamTap | None = None

    @property
    def user_id(self) -> str:
        return self.owner.user_id

    @property
    def stream(self) -> bool:
        return self.estimate is not None and self.estimate.stream


def client_host(request: http.Request) -> tuple[str, int | None]:
    """Host and port the client addressed (its Host header, or :authority on HTTP/2)."""
    try:
        host, port = url.parse_authority(request.host_header or "", check=False)
    except ValueError:
        return request.host, None
    return host.lower() or request.host, port


def request_api(request: http.Request) -> tuple[str, str | None, Style]:
    """(path without query, metered API or None, error style) of a request."""
    path = request.path.partition("?")[0]
    api = api_for(path)
    return path, api, errors.style_for(api, path)


def model_of(api: str, path: str, body: dict[str, Any]) -> str:
    """The requested model: the body's ``model``, or on Gemini the path's."""
    if api.startswith("gemini."):
        found = GEMINI_MODEL.search(path)
        model: object = found.group(1) if found else None
    else:
        model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Rejection(errors.BAD_REQUEST, "'model' is required and must be a string")
    return model


def check_owner(owner: KeyOwner | None, now: datetime) -> KeyOwner:
    if owner is None:
        raise Rejection(errors.INVALID_KEY, "Invalid API key")
    if not owner.key_active or owner.user.get("isActive", True) is False:
        raise Rejection(errors.REVOKED_KEY, "API key has been revoked")
    if owner.key_expires_at is not None and owner.key_expires_at <= now:
        raise Rejection(errors.REVOKED_KEY, "API key has expired")
    return owner


class Admission:
    def __init__(
        self,
        config: Config,
        store: Store,
        cache: KeyCache,
        writer: SettlementWriter,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.store = store
        self.cache = cache
        self.writer = writer
        self.executor = executor

    async def _in_thread[T](self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def authenticate(self, flow: http.HTTPFlow) -> Ticket:
        request = flow.request
        path, api, style = request_api(request)
        key = client_key(request, style)
        if key is None:
            raise Rejection(errors.MISSING_KEY, "Missing API key (Authorization: Bearer KEY)")
        found, owner = self.cache.get(key)
        if not found:
            try:
                owner = await self._in_thread(self.store.find_key, key)
            except StoreError as e:
                raise Rejection(errors.UNAVAILABLE, "Metering store unavailable") from e
            self.cache.put(key, owner)
        owner = check_owner(owner, utcnow())
        host, port = client_host(request)
        route = self.config.route(host, port, flow.client_conn.sockname[1])
        return Ticket(
            api=api,
            style=style,
            path=path,
            host=(request.host_header or host).lower(),
            upstream=url.hostport(request.scheme, request.host, request.port),
            owner=owner,
            key_mask=mask_key(key),
            route=route,
            pool=route.pool if route else self.config.default_pool,
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
        body = self._json_body(request)
        try:
            ticket.estimate = estimate_request(ticket.api, body, self.config, ticket.path)
        except ValueError as e:
            raise Rejection(errors.BAD_REQUEST, str(e)) from e
        ticket.model = model_of(ticket.api, ticket.path, body)
        multiplier = ticket.route.multiplier if ticket.route else Decimal(1)
        try:
            ticket.quote = resolve_price(
                self.config, ticket.model, multiplier, upstream_url=request.url
            )
        except UnknownModelError as e:
            raise Rejection(errors.UNKNOWN_MODEL, str(e)) from e
        ticket.pool = ticket.quote.pool or ticket.pool
        if ticket.estimate.stream:
            prepare_stream(request, ticket.api, body)
        pool = self.config.pools[ticket.pool]
        expires = ticket.owner.user.get(pool.expires) if pool.expires else None
        if isinstance(expires, datetime) and expires <= utcnow():
            raise Rejection(
                errors.CREDITS_EXPIRED, "Credits have expired. Please purchase new credits."
            )
        if self.writer.backlogged:
            raise Rejection(errors.UNAVAILABLE, "Metering is backlogged, retry later")
        maximum, minimum = hold_amounts(ticket.estimate, ticket.quote)
        try:
            hold = await self._in_thread(
                self.store.hold, flow.id, ticket.user_id, pool, maximum, minimum
            )
        except StoreError as e:
            raise Rejection(errors.UNAVAILABLE, "Metering store unavailable") from e
        if isinstance(hold, Refusal):
            raise Rejection(
                errors.INSUFFICIENT_CREDITS,
                f"Insufficient credits. Current balance: ${hold.balance:.2f}",
                balance=float(hold.balance),
            )
        ticket.hold = hold

    @staticmethod
    def _json_body(request: http.Request) -> dict[str, Any]:
        try:
            body = json.loads(request.content or b"")
        except ValueError as e:
            raise Rejection(errors.BAD_REQUEST, f"Request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise Rejection(errors.BAD_REQUEST, "Request body must be a JSON object")
        return body


def prepare_stream(request: http.Request, api: str, body: dict[str, Any]) -> None:
    """Ask for an uncompressed stream that reports its usage.

    OpenAI chat streams carry usage only with ``stream_options.include_usage``; with it the
    client gets one extra final chunk (``choices: []``).
    """
    request.headers["accept-encoding"] = "identity"
    if api != "openai.chat":
        return
    options = body.get("stream_options")
    if options is None:
        options = body["stream_options"] = {}
    if not isinstance(options, dict):
        raise Rejection(errors.BAD_REQUEST, "'stream_options' must be an object")
    if options.get("include_usage") is not True:
        options["include_usage"] = True
        request.set_content(json.dumps(body).encode())
