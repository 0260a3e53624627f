"""What each admin endpoint answers, built from the reports the CLI prints.

Each function returns a record of Decimals and datetimes: the endpoint serialises it as the
CLI's JSON does (``stats.output.plain``), the dashboard formats the same record for people.
Field names are the original admin API's where it had the field (README, "The admin
dashboard"; the summary's in ``docs/reports.md``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from burnmeter.periods import Bucket
from burnmeter.periods import Window
from burnmeter.reports.base import Reports

HOURLY_UP_TO = timedelta(days=3)  # longer windows are drawn by day


def window_fields(span: Window) -> dict[str, Any]:
    return {
        "period": span.period,
        "window_start": span.local_start,
        "window_end": span.local_end,
    }


def default_bucket(span: Window) -> Bucket:
    """Hours for windows up to 3 days, days beyond (and for ``all``)."""
    if span.start is not None and span.end - span.start <= HOURLY_UP_TO:
        return "hour"
    return "day"


def user_stats(reports: Reports, span: Window) -> dict[str, Any]:
    """``burnmeter summary --format json``."""
    return reports.summary(span).as_dict()


def metrics(reports: Reports, span: Window) -> dict[str, Any]:
    return reports.metrics(span).as_dict()


def model_stats(reports: Reports, span: Window) -> dict[str, Any]:
    """``burnmeter models`` under the original admin API's names (module docstring), by
    ``totalTokens`` (then cost)."""
    rows: list[dict[str, Any]] = [
        {
            "model": m.model,
            "requestCount": m.requests,
            "inputTokens": m.input_tokens,
            "outputTokens": m.output_tokens,
            "cacheWriteTokens": m.cache_write_tokens,
            "cacheHitTokens": m.cache_read_tokens,
            "totalTokens": m.input_tokens
            + m.output_tokens
            + m.cache_write_tokens
            + m.cache_read_tokens,
            "creditsBurned": m.cost,
        }
        for m in reports.models(span)
    ]
    rows.sort(key=lambda row: -row["totalTokens"])  # stable: equal totals stay by cost
    return window_fields(span) | {"models": rows}


def users(reports: Reports, span: Window, top: int | None = None) -> dict[str, Any]:
    """Every user by spend in the window (``burnmeter users``' order), with balances now."""
    rows = [
        {
            "userId": a.user,
            "creditsBurned": a.burned,
            "burned_by_pool": a.burned_by_pool,
            "requestCount": a.requests,
            "inputTokens": a.input_tokens,
            "outputTokens": a.output_tokens,
            "lastActivity": None
            if a.last_activity is None
            else a.last_activity.astimezone(span.zone),
            "balances": a.balances,
        }
        for a in reports.accounts(span, top)
    ]
    return window_fields(span) | {"users": rows}


def series(reports: Reports, span: Window, unit: Bucket) -> dict[str, Any]:
    """``burnmeter series --format json``: spend per pool per local hour or day."""
    rows = reports.series(span, unit)
    return window_fields(span) | {"bucket": unit, "series": [r.as_dict() for r in rows]}
