"""The admin web surface: the original admin API's JSON endpoints under ``/admin/…`` (README,
"The admin dashboard") and the dashboard.

Read-only over the store it is given. Every request needs the admin token: an
``Authorization: Bearer`` header, or the session cookie the browser gets by opening
``/admin?token=T`` once (it is then redirected to the same page without the token, so the
token stays out of the address bar, the history and every page).
"""

from __future__ import annotations

import hmac
import logging
import os
import sqlite3
import sys
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait
from dataclasses import dataclass
from hashlib import sha256
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo
from zoneinfo import available_timezones

from flask import Flask
from flask import Response
from flask import jsonify
from flask import redirect
from flask import render_template
from flask import request
from flask import session
from flask import stream_with_context
from flask import url_for
from werkzeug.exceptions import HTTPException

from burnmeter.exceptions import PeriodError
from burnmeter.exceptions import StoreError
from burnmeter.periods import ALL
from burnmeter.periods import BUCKETS
from burnmeter.periods import PERIODS
from burnmeter.periods import Bucket
from burnmeter.periods import Window
from burnmeter.periods import requested_window
from burnmeter.reports import reports_for
from burnmeter.reports.base import OriginalPools
from burnmeter.reports.base import Reports
from burnmeter.store.base import Store
from stats.admin import chart
from stats.admin import formats
from stats.admin import payloads
from stats.exceptions import BadQuery
from stats.output import plain

DASHBOARD_PERIOD = "8h"  # the original dashboard's default (README, "The admin dashboard")
API_PERIOD = "24h"  # the CLI's default
TOP_USERS = 10
REFRESH_SECONDS = 30
WINDOW_PARAMS = ("tz", "now", "since", "until")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

ZONES = sorted(available_timezones())  # the zone field's suggestions
log = logging.getLogger("burnmeter.serve")


@dataclass(frozen=True, slots=True)
class Card:
    label: str
    metric: str  # the field of /admin/user-stats it shows (dotted into burned_by_pool)
    text: str
    note: str = ""


def _session_key(token: str) -> bytes:
    """Sessions are signed with a key derived from the token: a new token ends them all."""
    return hmac.new(token.encode(), b"burnmeter admin session", sha256).digest()


def create_app(store: Store, zone: ZoneInfo, token: str) -> Flask:
    """The app over an open store; ``zone`` is the reporting zone when a request names none."""
    app = Flask(__name__, static_url_path="/admin/static")
    app.config.update(
        SECRET_KEY=_session_key(token),
        SESSION_COOKIE_NAME="burnmeter_admin",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_PATH="/admin",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    expected = token.encode()
    # the dashboard's reports side by side; more threads than cores only slow the first one
    workers = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="burnmeter-report")
    app.extensions["burnmeter_workers"] = workers

    def token_ok(given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)

    def unauthorized() -> Response:
        if request.endpoint == "dashboard":
            response = Response(render_template("unauthorized.html"), 401)
        else:
            response = jsonify(error="Unauthorized: send Authorization: Bearer <admin token>")
            response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="burnmeter admin"'
        return response

    @app.before_request
    def authenticate() -> Response | None:
        given = request.args.get("token")
        if given is not None:
            if not token_ok(given) or request.endpoint is None:
                return unauthorized()
            session["admin"] = True
            rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
            target = url_for(request.endpoint, **(request.view_args or {}))
            if rest:
                target += "?" + urlencode(rest)
            return redirect(target, 303)  # type: ignore[return-value]
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token_ok(credentials.strip()):
            return None
        if session.get("admin") is True:
            return None
        return unauthorized()

    @app.after_request
    def harden(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    def span(default_period: str) -> Window:
        args = request.args
        period = args.get("period")
        if period is not None and period not in PERIODS:
            raise BadQuery({"error": "Invalid period", "valid_periods": list(PERIODS)})
        if period is None and "since" not in args and "until" not in args:
            period = default_period
        try:
            return requested_window(
                period, args.get("tz"), args.get("now"), args.get("since"), args.get("until"), zone
            )
        except PeriodError as e:
            body: dict[str, Any] = {"error": str(e)}
            if e.source:
                body["parameter"] = e.source
            raise BadQuery(body) from None

    def answer(build: Callable[[Reports, Window], dict[str, Any]], period: str) -> Response:
        return jsonify(plain(build(reports_for(store), span(period))))

    @app.get("/admin/user-stats")
    def user_stats() -> Response:
        return answer(payloads.user_stats, API_PERIOD)

    @app.get("/admin/metrics")
    def metrics() -> Response:
        return answer(payloads.metrics, API_PERIOD)

    @app.get("/admin/model-stats")
    def model_stats() -> Response:
        return answer(payloads.model_stats, API_PERIOD)

    @app.get("/admin/users")
    def users() -> Response:
        top = _positive_int("limit")
        return answer(lambda r, s: payloads.users(r, s, top), ALL)

    @app.get("/admin/series")
    def series() -> Response:
        unit = request.args.get("bucket")
        if unit is not None and unit not in BUCKETS:
            raise BadQuery({"error": "Invalid bucket", "valid_buckets": list(BUCKETS)})
        return answer(
            lambda r, s: payloads.series(r, s, _bucket(unit) or payloads.default_bucket(s)),
            API_PERIOD,
        )

    @app.get("/admin")
    def dashboard() -> Response:
        view = {k: request.args[k] for k in WINDOW_PARAMS if request.args.get(k)}
        try:
            window = span(DASHBOARD_PERIOD)
        except BadQuery as e:
            page = _page(view=view, chosen=request.args.get("period"), error=str(e))
            return Response("".join(page), 400)
        reports = _Reports(workers, store, window)
        page = _page(
            view=view, chosen=window.period, window=window, reports=reports, pools=list(store.pools)
        )
        return Response(stream_with_context(page))

    @app.errorhandler(BadQuery)
    def bad_query(e: BadQuery) -> tuple[Response, int]:
        return jsonify(e.body), 400

    @app.errorhandler(PeriodError)
    def bad_window(e: PeriodError) -> tuple[Response, int]:  # found by a report (a series too long)
        return jsonify(error=str(e)), 400

    @app.errorhandler(StoreError)
    @app.errorhandler(sqlite3.Error)  # the SQLite reports' own queries (locked, not a store)
    def store_down(e: Exception) -> tuple[Response, int]:
        log.error("store error: %s", e)
        return jsonify(error=f"store unavailable: {e}"), 503

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[Response, int]:
        return jsonify(error=e.name), e.code or 500

    @app.errorhandler(Exception)
    def internal(e: Exception) -> tuple[Response, int]:
        log.error("internal error on %s: %s: %s", request.path, type(e).__name__, e)
        return jsonify(error="internal error"), 500

    return app


def _positive_int(name: str) -> int | None:
    text = request.args.get(name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) < 1:
        raise BadQuery({"error": f"{name} must be a whole number from 1 to 999,999,999"})
    return int(text)


def _bucket(unit: str | None) -> Bucket | None:
    return next((b for b in BUCKETS if b == unit), None)


class _Reports:
    """The dashboard's reports, on the worker threads (each has its own store connection)."""

    def __init__(self, workers: ThreadPoolExecutor, store: Store, window: Window) -> None:
        self.workers = workers
        self.store = store
        self.window = window
        self.started: list[Future[dict[str, Any]]] = []

    def start(self, job: Callable[[Reports, Window], dict[str, Any]]) -> Future[dict[str, Any]]:
        future = self.workers.submit(lambda: job(reports_for(self.store), self.window))
        self.started.append(future)
        return future

    def finish(self) -> None:
        """Cancel the reports not begun and wait for the rest: none outlives the page (one
        that failed, or a client gone, would leave them reading a store that may be closed)."""
        for future in self.started:
            future.cancel()
        wait(self.started)


def _cards(summary: dict[str, Any], original: OriginalPools) -> list[Card]:
    by_pool = [
        Card(f"Burned · {pool}", f"burned_by_pool.{pool}", formats.money(amount))
        for pool, amount in summary["burned_by_pool"].items()
    ]
    return [
        Card(
            "Burned",
            "total_credits_used",
            formats.money(summary["total_credits_used"]),
            f"{original.legacy} pool, legacy logs included",
        ),
        Card(
            "New Burned",
            "total_creditsNewUsed",
            formats.money(summary["total_creditsNewUsed"]),
            f"{original.new or 'no'} pool",
        ),
        Card("Burned, all pools", "total_burned", formats.money(summary["total_burned"])),
        *by_pool,
        Card("Credits", "total_credits", formats.money(summary["total_credits"]), "now"),
        Card(
            "Ref credits", "total_ref_credits", formats.money(summary["total_ref_credits"]), "now"
        ),
        Card("New credits", "total_creditsNew", formats.money(summary["total_creditsNew"]), "now"),
        Card("Users", "total_users", formats.count(summary["total_users"]), "now"),
        Card("Active users", "active_users", formats.count(summary["active_users"])),
        Card("Requests", "requests", formats.count(summary["requests"])),
        Card("Success rate", "success_rate", formats.percent(summary["success_rate"])),
        Card("Avg latency", "avg_latency_ms", formats.millis(summary["avg_latency_ms"])),
        Card("Tokens in", "total_input_tokens", formats.count(summary["total_input_tokens"])),
        Card("Tokens out", "total_output_tokens", formats.count(summary["total_output_tokens"])),
    ]


def _page(
    *,
    view: dict[str, str],
    chosen: str | None,
    window: Window | None = None,
    error: str | None = None,
    reports: _Reports | None = None,
    pools: list[str] | None = None,
) -> Iterator[str]:
    """The dashboard, section by section as its report is ready. The summary runs first and
    alone, so that the cards are painted as soon as it can be; the chart and the tables are
    summed side by side after it."""
    common = {
        "periods": PERIODS,
        "chosen": chosen,
        "view": view,
        "window": window,
        "error": error,
        "refresh": REFRESH_SECONDS,
        "formats": formats,
    }
    yield render_template("admin/start.html", **common)
    try:
        if reports is not None:
            summary = reports.start(payloads.user_stats).result()
            yield render_template(
                "admin/cards.html", cards=_cards(summary, OriginalPools.of(reports.store.pools))
            )
            unit = payloads.default_bucket(reports.window)
            series = reports.start(lambda r, w: payloads.series(r, w, unit))
            users = reports.start(lambda r, w: payloads.users(r, w, TOP_USERS))
            models = reports.start(payloads.model_stats)
            rows = series.result()
            yield render_template(
                "admin/chart.html",
                chart=chart.series_svg(rows["series"], rows["bucket"]),
                legend=chart.legend(rows["series"]),
                bucket=rows["bucket"],
            )
            yield render_template(
                "admin/tables.html",
                users=users.result()["users"],
                models=models.result()["models"],
                pools=pools or [],
                formats=formats,
            )
    except Exception as e:  # the page has begun: say so on it, in one line in the log
        log.error("dashboard: %s: %s", type(e).__name__, e)
        yield render_template("admin/failed.html", error=e)
    finally:
        if reports is not None:
            reports.finish()
    yield render_template("admin/end.html", zones=ZONES, **common)


def log_to_stderr() -> None:
    """The server's own errors as one line each on stderr (no request line, no token)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("burnmeter serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
