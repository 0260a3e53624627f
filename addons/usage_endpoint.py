"""``GET /burnmeter/usage``: a client's own balances and spend, answered by the proxy.

The client authenticates with its key as on any request (``Authorization: Bearer``, or
``x-api-key``); the request is never forwarded. The answer::

    {"user": "alice", "balances": {"openhands": 4.5}, "expires": {"openhands": null},
     "spent": {"1h": 0.1, "24h": 0.5, "7d": 2.0, "30d": 5.0}, "requests": {"24h": 12}}

Balances are what ``burnmeter accounts show`` prints; spend comes from the same windows
and reports as ``burnmeter users`` (``24h`` is since local midnight in the config's time
zone). The store is read on a thread of its own; one user's answer is reused for
``CACHE_SECONDS``.

This addon runs before the metering addon, which leaves a flow answered here alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING
from typing import Any

from mitmproxy import http

from addons import errors
from addons.errors import Problem
from addons.errors import Style
from addons.errors import error_response
from addons.exceptions import Rejection
from addons.inspection import annotate
from addons.keys import drop_client_key
from burnmeter import periods
from burnmeter.exceptions import StoreError
from burnmeter.money import ZERO
from burnmeter.reports import reports_for
from burnmeter.store.base import KeyOwner

if TYPE_CHECKING:
    from addons.metering import Metering

logger = logging.getLogger(__name__)

USAGE_PATH = "/burnmeter/usage"
API = "burnmeter.usage"
SPENT_PERIODS = ("1h", "24h", "7d", "30d")
CACHE_SECONDS = 2.0
MAX_CACHED = 10_000
READ_TIMEOUT = 5.0
METHOD_NOT_ALLOWED = Problem(
    405, "method_not_allowed", "invalid_request_error", "invalid_request_error", "UNIMPLEMENTED"
)


def is_usage_request(request: http.Request) -> bool:
    """The one place that decides a request is for this endpoint (answered locally)."""
    return request.path.partition("?")[0] == USAGE_PATH


def key_style(request: http.Request) -> Style:
    """Anthropic clients send ``x-api-key``; everyone else ``Authorization: Bearer``."""
    headers = request.headers
    return "anthropic" if "x-api-key" in headers and "authorization" not in headers else "openai"


def usd(amount: Decimal) -> float | int:
    return int(amount) if amount == amount.to_integral_value() else float(amount)


class UsageEndpoint:
    def __init__(self, metering: Metering) -> None:
        self.metering = metering
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._reading: dict[str, Future[bytes]] = {}
        """One read per user at a time: concurrent asks wait for the same answer."""
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="burnmeter-usage")

    async def requestheaders(self, f: http.HTTPFlow) -> None:
        if f.response or f.error or not is_usage_request(f.request):
            return
        style = key_style(f.request)
        try:
            body = await self._answer(f.request, style)
        except Rejection as r:
            f.response = error_response(style, r.problem, r.message)
            record = {"outcome": "rejected", "status": r.problem.status, "reason": r.problem.code}
        else:
            f.response = http.Response.make(
                200, body, {"Content-Type": "application/json", "Cache-Control": "no-store"}
            )
            record = {"outcome": "passthrough", "status": 200, "reason": None}
        drop_client_key(f.request)
        annotate(f, {**record, "api": API, "pool": ""})

    async def _answer(self, request: http.Request, style: Style) -> bytes:
        admission, settings = self.metering.admission, self.metering.settings
        if admission is None or settings is None:
            raise Rejection(errors.UNAVAILABLE, "Metering is not configured")
        if request.method != "GET":
            raise Rejection(METHOD_NOT_ALLOWED, f"{request.method} {USAGE_PATH}: use GET")
        key, owner, _ = await admission.identify(request, style)
        admission.check_rate(key, None)  # the key's global budget, as any request's
        cached = self._cache.get(owner.user_id)
        if cached is not None and time.monotonic() - cached[0] < CACHE_SECONDS:
            return cached[1]
        future = self._reading.get(owner.user_id)
        if future is None:
            future = self._reading[owner.user_id] = self._executor.submit(self._read, owner)
            future.add_done_callback(lambda _: self._reading.pop(owner.user_id, None))
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                body = await asyncio.wrap_future(future)
        except (TimeoutError, StoreError) as e:
            logger.warning("metering: usage of %s not read: %s", owner.user_id, e or "timeout")
            raise Rejection(errors.UNAVAILABLE, "Metering store unavailable, retry later") from e
        return body

    def _read(self, owner: KeyOwner) -> bytes:
        """``read``, cached before the read is done (an ask arriving then finds the answer)."""
        body = self.read(owner)
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[owner.user_id] = (time.monotonic(), body)
        return body

    def read(self, owner: KeyOwner) -> bytes:
        """The answer for ``owner``, from the store (on a worker thread)."""
        metering = self.metering
        store, settings = metering.store, metering.settings
        if store is None or settings is None:
            raise StoreError("metering is not configured")
        pools = settings.config.pools
        user = store.user(owner.user_id) or owner.user
        zone = settings.config.zone
        now = periods.now_utc()
        backend = reports_for(store).backend
        spent: dict[str, Any] = {}
        requests_today = 0
        for period in SPENT_PERIODS:
            rows = backend.user_usage(periods.window(period, zone, now), owner.user_id)
            spent[period] = usd(sum((r.cost for r in rows), ZERO))
            if period == periods.TODAY:
                requests_today = sum(r.requests for r in rows)
        expires = {}
        for name, pool in pools.items():
            at = user.get(pool.expires) if pool.expires else None
            expires[name] = at.isoformat() if isinstance(at, datetime) else None
        answer = {
            "user": owner.user_id,
            "balances": {name: usd(store.balance(owner.user_id, p)) for name, p in pools.items()},
            "expires": expires,
            "spent": spent,
            "requests": {"24h": requests_today},
        }
        return json.dumps(answer).encode()

    def done(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
