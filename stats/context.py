"""What every command shares: the config and the store, each found and opened once.

Command modules import ``Context`` from here (``UserError`` from ``stats.exceptions``), and
``stats.cli`` imports the command modules: the dependency runs one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from functools import cached_property

import click

from burnmeter.config import Config
from burnmeter.config import ConfigSource
from burnmeter.config import find_config
from burnmeter.config import load_config
from burnmeter.exceptions import ConfigError
from burnmeter.exceptions import StoreError
from burnmeter.exceptions import StoreURLError
from burnmeter.store import open_store
from burnmeter.store import resolve_url
from burnmeter.store.base import Store
from stats.exceptions import UserError


@dataclass
class Context:
    """The global options, and what they name: the config and, opened on first use, the
    store: ``read_only_store`` for reports, ``store`` for the commands that change data,
    ``new_store`` for those that may create it."""

    db_url: str | None
    config_path: str | None
    debug: bool = False
    _stores: list[Store] = field(default_factory=list)

    @cached_property
    def config_source(self) -> ConfigSource:
        return find_config(self.config_path)

    @cached_property
    def config(self) -> Config:
        source = self.config_source
        if source.implicit:  # the user did not name it: say which one this is
            click.echo(f"burnmeter: config {source.describe()}", err=True)
        try:
            return load_config(source.path)
        except ConfigError as e:
            raise UserError(str(e)) from None

    @property
    def url(self) -> str:
        """--db, $BURNMETER_DB, the config's ``db`` (of a config file), ./burnmeter.db."""
        return resolve_url(self.db_url, self.config.db if self.config_source.path else None)

    @cached_property
    def read_only_store(self) -> Store:
        """The store for commands that only read: it must exist, and nothing is written."""
        return self._open(read_only=True, create=False)

    @cached_property
    def store(self) -> Store:
        """The store for commands that change data in a store that must exist."""
        return self._open(read_only=False, create=False)

    @cached_property
    def new_store(self) -> Store:
        """The store, created if there is none (``accounts create``, ``import``)."""
        return self._open(read_only=False, create=True)

    def _open(self, *, read_only: bool, create: bool) -> Store:
        try:
            store = open_store(self.url, self.config.pools, read_only=read_only, create=create)
        except (StoreURLError, StoreError) as e:
            raise UserError(str(e)) from None
        self._stores.append(store)
        if not read_only:
            store.ensure_schema(None)  # the proxy's config, not this one, sets the TTL
        return store

    def close(self) -> None:
        for store in self._stores:
            store.close()
