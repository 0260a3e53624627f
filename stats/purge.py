"""``burnmeter purge``: delete the request logs older than the retention, on request.

Nothing else in the CLI deletes logs: reports only read, and the proxy's writer applies
its own config's ``log_ttl_days``.
"""

from __future__ import annotations

from datetime import timedelta

import click

from burnmeter.documents import utcnow
from stats.context import Context
from stats.output import emit_record
from stats.output import format_option


@click.command()
@click.option(
    "--days",
    type=click.IntRange(min=1, max=36500),
    metavar="N",
    help="Delete logs older than N days instead of the config's log_ttl_days.",
)
@click.option("--yes", "-y", is_flag=True, help="Delete without asking.")
@format_option
@click.pass_obj
def purge(state: Context, days: int | None, yes: bool, fmt: str) -> None:
    """Delete the request logs older than the config's `log_ttl_days` (or --days N).

    Says which config and store, how many logs and from before when, then asks (unless
    --yes). With log_ttl_days = 0 and no --days, logs are kept forever: nothing to do.
    Users' balances and counters are not touched."""
    config = state.config
    ttl = days if days is not None else config.log_ttl_days
    where = f"config {state.config_source.describe()}, store {state.url}"
    record: dict[str, object] = {"config": state.config_source.path, "days": ttl}
    if not ttl:
        click.echo(f"log_ttl_days = 0 ({where}): logs are kept forever, nothing to purge")
        return
    before = utcnow() - timedelta(days=ttl)
    store = state.store
    count = store.count_logs(before)
    record |= {"before": before, "to_delete": count}
    if fmt == "table":
        click.echo(
            f"{count:,} request log(s) created before {before:%Y-%m-%d %H:%M} UTC"
            f" (older than {ttl} days; {where})"
        )
    if count and not yes:
        click.confirm(f"Delete {count:,} request log(s)?", abort=True, err=True)
    deleted = store.purge_logs(before) if count else 0
    if fmt == "table":
        click.echo(f"deleted {deleted:,}")
    else:
        emit_record(record | {"deleted": deleted}, fmt)
