"""burnmeter: spend reports and account management for the metering proxy.

Every command reads the same store as the proxy (``--db``, $BURNMETER_DB, the config's
``db``, or ./burnmeter.db).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from dataclasses import field
from functools import cached_property

import click

from burnmeter.config import Config
from burnmeter.config import ConfigError
from burnmeter.config import load_config
from burnmeter.store import open_store
from burnmeter.store import resolve_url
from burnmeter.store.base import Store


@dataclass
class Context:
    """What every command shares: the config and, opened on first use, the store."""

    db_url: str | None
    config_path: str | None
    _stores: list[Store] = field(default_factory=list)

    @cached_property
    def config(self) -> Config:
        return load_config(self.config_path)

    @cached_property
    def store(self) -> Store:
        url = resolve_url(self.db_url, self.config.db if self.config_path else None)
        store = open_store(url, self.config.pools)
        store.ensure_schema(self.config.log_ttl_days)
        self._stores.append(store)
        return store

    def close(self) -> None:
        for store in self._stores:
            store.close()


pass_context = click.make_pass_decorator(Context)


class OneLineErrors(click.Group):
    """Runtime errors end the command with one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (ConfigError, ValueError, KeyError, LookupError, OSError, RuntimeError) as e:
            message = e.args[0] if isinstance(e, KeyError) and e.args else e
            click.echo(f"burnmeter: error: {message}", err=True)
            sys.exit(1)
        except Exception as e:  # a bug: still one line, named so that it can be reported
            click.echo(f"burnmeter: internal error: {type(e).__name__}: {e}", err=True)
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
    help="TOML config (pools, routes, prices, time zone); built-in default if omitted.",
)
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, config_path: str | None) -> None:
    """Spend reports and account management for the burnmeter metering proxy."""
    state = Context(db_url, config_path)
    ctx.obj = state
    ctx.call_on_close(state.close)


def _register() -> None:
    from stats import accounts
    from stats import imports
    from stats import journal
    from stats import reports

    for module in (accounts, imports, journal, reports):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="burnmeter")
