"""``burnmeter summary|users|models|series|logs|reconcile``: spend over a period.

Reports open the store read-only and never delete anything. Every number comes from the
request logs the store still holds: the proxy deletes logs older than its config's
``log_ttl_days`` (and ``burnmeter purge`` does on request), so a report reaching further
back is incomplete.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict
from decimal import Decimal
from typing import Any

import click

from burnmeter import schema
from burnmeter.exceptions import PeriodError
from burnmeter.periods import ALL
from burnmeter.periods import BUCKETS
from burnmeter.periods import PERIODS
from burnmeter.periods import Bucket
from burnmeter.periods import Window
from burnmeter.periods import requested_window
from burnmeter.reports import reports_for
from burnmeter.reports.base import Summary
from stats.accounts import Amount
from stats.context import Context
from stats.output import emit_record
from stats.output import emit_rows
from stats.output import format_option

USERS_TABLE = ["user", "pool", "cost", "input_tokens", "output_tokens", "requests"]
MODELS_TABLE = [
    "model",
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_write_tokens",
    "cache_read_tokens",
    "cost",
]
LOGS_TABLE = schema.REQUEST_LOG.listed()
RECONCILE_TABLE = ["user", "pool", "used", "logged", "difference"]


def period_options(command: Callable[..., None]) -> Callable[..., None]:
    """``--period --tz --now --since --until``, handed to the command as one ``Window``."""

    @click.option(
        "--period",
        type=click.Choice(PERIODS),
        metavar="P",
        help=f"One of {', '.join(PERIODS)}: rolling windows ending now, except 24h "
        "(since 00:00 today in the reporting zone) and all (no lower bound). "
        "Default: 24h.",
    )
    @click.option(
        "--tz",
        metavar="ZONE",
        help="Reporting time zone (IANA name); default: the config's `timezone`.",
    )
    @click.option(
        "--now",
        "now_text",
        metavar="ISO",
        help="Report as if it were this time (ISO 8601; without an offset it is "
        "in the reporting zone).",
    )
    @click.option(
        "--since",
        "since_text",
        metavar="ISO",
        help="Custom window start (ISO 8601, inclusive); instead of --period.",
    )
    @click.option(
        "--until",
        "until_text",
        metavar="ISO",
        help="Custom window end (ISO 8601, exclusive; default now); instead of --period.",
    )
    @functools.wraps(command)
    def wrapper(
        state: Context,
        period: str | None,
        tz: str | None,
        now_text: str | None,
        since_text: str | None,
        until_text: str | None,
        **kwargs: Any,
    ) -> None:
        try:
            span = requested_window(period, tz, now_text, since_text, until_text, state.config.zone)
        except PeriodError as e:
            if e.source is None:
                raise click.UsageError(str(e)) from None
            raise click.BadParameter(str(e), param_hint=f"'--{e.source}'") from None
        command(state, span, **kwargs)

    return wrapper


@click.command()
@click.pass_obj
@period_options
@format_option
def summary(state: Context, span: Window, fmt: str) -> None:
    """Balances now, and spend, tokens and requests over the period.

    "Burned" is the ohmygpt pool (logs without a creditType count there too), "New Burned"
    the openhands pool; total_burned and burned_by_pool cover every pool. Balances and
    total_users are current, never filtered by the period. active_users is, for `all`, the
    users with a positive balance in some pool, otherwise the users with a request in the
    window. success_rate is the percent of requests with isSuccess, null without requests.
    """
    report = reports_for(state.read_only_store).summary(span)
    record = report.as_dict()
    if fmt == "table":
        emit_record(_summary_lines(report), fmt)
        return
    if fmt == "csv":
        record |= {f"burned_by_pool.{name}": v for name, v in record.pop("burned_by_pool").items()}
    emit_record(record, fmt)


def _usd_text(amount: Decimal) -> str:
    return f"{amount:,.4f} USD"


def _active_word(s: Summary) -> str:
    """What ``active_users`` counts: for `all`, users with a positive balance somewhere."""
    return "funded" if s.window.period == ALL else "active"


def _summary_lines(s: Summary) -> dict[str, str]:
    by_pool = {f"  {name}": _usd_text(amount) for name, amount in s.burned_by_pool.items()}
    rate = "—" if s.success_rate is None else f"{s.success_rate:g}% ok"
    latency = "—" if s.avg_latency_ms is None else f"{s.avg_latency_ms:,} ms"
    return {
        "Period": s.window.describe(),
        "Users": f"{s.total_users:,} ({s.active_users:,} {_active_word(s)})",
        "Credits": _usd_text(s.balances["total_credits"]),
        "Ref credits": _usd_text(s.balances["total_ref_credits"]),
        "New credits": _usd_text(s.balances["total_creditsNew"]),
        "Burned": f"{_usd_text(s.burned)}  ({s.original_pools.legacy}, legacy logs included)",
        "New Burned": f"{_usd_text(s.new_burned)}  ({s.original_pools.new or 'no pool'})",
        "Burned, all pools": _usd_text(s.total_burned),
        **by_pool,
        "Requests": f"{s.requests:,} ({rate})",
        "Avg latency": latency,
        "Tokens in / out": f"{s.input_tokens:,} / {s.output_tokens:,}",
    }


@click.command()
@click.pass_obj
@period_options
@click.option(
    "--top",
    type=click.IntRange(min=1),
    metavar="N",
    help="Only the N users who spent most (all pools together); default: every user.",
)
@format_option
def users(state: Context, span: Window, top: int | None, fmt: str) -> None:
    """Spend, tokens and requests per user and pool over the period, biggest spenders first."""
    rows = reports_for(state.read_only_store).users(span, top)
    emit_rows([asdict(r) for r in rows], USERS_TABLE, fmt)


@click.command()
@click.pass_obj
@period_options
@format_option
def models(state: Context, span: Window, fmt: str) -> None:
    """Requests, the four token counts and cost per model over the period, by cost."""
    rows = reports_for(state.read_only_store).models(span)
    emit_rows([asdict(r) for r in rows], MODELS_TABLE, fmt)


@click.command()
@click.pass_obj
@period_options
@click.option(
    "--bucket",
    "unit",
    type=click.Choice(BUCKETS),
    default="hour",
    show_default=True,
    help="Local hours or days of the reporting zone (a DST day has 23 or 25 hours).",
)
@click.option(
    "--plot",
    "plot_file",
    type=click.Path(dir_okay=False, writable=True),
    metavar="FILE.png",
    help="Also draw the series as stacked bars into FILE.png (needs matplotlib).",
)
@format_option
def series(state: Context, span: Window, unit: Bucket, plot_file: str | None, fmt: str) -> None:
    """Spend per pool in each hour or day of the period (empty buckets included)."""
    rows = reports_for(state.read_only_store).series(span, unit)
    pools = list(rows[0].burned) if rows else []
    if plot_file:
        from stats.plot import plot_series

        plot_series(rows, pools, span, unit, plot_file)
        click.echo(f"burnmeter: plot written to {plot_file}", err=True)
    if fmt == "json":
        emit_rows([r.as_dict() for r in rows], [], fmt)
    else:
        emit_rows(
            [{"start": r.start, **r.burned, "total": r.total} for r in rows],
            ["start", *pools, "total"],
            fmt,
        )


@click.command()
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    metavar="N",
    help="How many logs to show.",
)
@click.option("--user", metavar="USER", help="Only this user's logs.")
@format_option
@click.pass_obj
def logs(state: Context, limit: int, user: str | None, fmt: str) -> None:
    """The newest request logs first; JSON prints the whole documents."""
    docs = state.read_only_store.logs(limit, user)
    if fmt == "json":
        emit_rows(docs, [], fmt)
        return
    reporting = state.config.zone
    rows = [
        doc | {"createdAt": doc["createdAt"].astimezone(reporting)} if "createdAt" in doc else doc
        for doc in docs
    ]
    emit_rows(rows, LOGS_TABLE, fmt)


@click.command()
@click.option(
    "--tolerance",
    type=Amount(),
    default="0.000001",
    show_default=True,
    metavar="USD",
    help="Report a user's pool only when the two differ by more than this.",
)
@format_option
@click.pass_obj
def reconcile(state: Context, tolerance: Decimal, fmt: str) -> None:
    """Per user and pool: the pool's `used` counter against Σ creditsCost of its logs.

    Lists the pairs that differ (legacy logs without creditType count as ohmygpt); exits 0
    either way. The proxy deletes logs after `log_ttl_days`, so a user who spent before
    then shows used > logged without anything being wrong.
    """
    rows = reports_for(state.read_only_store).reconcile(tolerance)
    emit_rows([asdict(r) | {"difference": r.difference} for r in rows], RECONCILE_TABLE, fmt)
    ttl = state.config.log_ttl_days
    if ttl:
        click.echo(
            f"note: the proxy deletes logs older than {ttl} days (log_ttl_days); "
            "users who spent before then show used > logged",
            err=True,
        )
