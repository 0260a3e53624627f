"""burnmeter: spend reports and account management for the metering proxy.

Every command reads the same store as the proxy (``--db``, $BURNMETER_DB, the config's
``db``, or ./burnmeter.db) and the same config (``--config``, $BURNMETER_CONFIG,
./burnmeter.toml, or the built-in one).

A command lives in a module of its own under ``stats/`` and is registered below with one
``cli.add_command`` line; it takes the shared ``stats.context.Context`` (``@pass_obj``:
``read_only_store`` to read, ``store`` to write) and raises ``stats.exceptions.UserError``
where it finds a mistake of the user's. Command modules import from ``stats.context``,
never from this module.
"""

from __future__ import annotations

import sys
import traceback

import click

from burnmeter.exceptions import DocumentError
from burnmeter.exceptions import StoreError
from stats import accounts
from stats import imports
from stats import journal
from stats import purge
from stats import reports
from stats import reprice
from stats import serve
from stats.context import Context
from stats.exceptions import UserError


class OneLineErrors(click.Group):
    """Every failure ends the command with one line on stderr and exit status 1: the
    user's mistakes (``UserError``, raised where they are found), a store that is down or
    refuses a document, and bugs, which ``--debug`` shows with their traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except BrokenPipeError:
            raise  # the reader stopped (``| head``): click ends quietly
        except (StoreError, DocumentError) as e:
            raise UserError(str(e)) from e
        except Exception as e:
            if ctx.params.get("debug"):
                traceback.print_exc()
            else:
                click.echo(
                    f"burnmeter: internal error: {type(e).__name__}: {e}"
                    " (--debug shows the traceback)",
                    err=True,
                )
            sys.exit(1)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    envvar="BURNMETER_DB",
    help="Store URL: sqlite:///FILE or mongodb://HOST:PORT/DB [env BURNMETER_DB].",
)
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="TOML config (pools, routes, prices, time zone). Unset: $BURNMETER_CONFIG, "
    "then ./burnmeter.toml if it exists, then the built-in one.",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error.")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, config_path: str | None, debug: bool) -> None:
    """Spend reports and account management for the burnmeter metering proxy."""
    state = Context(db_url, config_path, debug)
    ctx.obj = state
    ctx.call_on_close(state.close)


cli.add_command(accounts.accounts)
cli.add_command(imports.import_command)
cli.add_command(journal.journal_group)
cli.add_command(purge.purge)
cli.add_command(reports.summary)
cli.add_command(reports.users)
cli.add_command(reports.models)
cli.add_command(reports.series)
cli.add_command(reports.logs)
cli.add_command(reports.reconcile)
cli.add_command(reprice.reprice_command)
cli.add_command(serve.serve)


def main() -> None:
    cli(prog_name="burnmeter")
