"""The addon's mitmproxy options, and their validation into typed ``Settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mitmproxy import exceptions

from burnmeter.alerts import AlertConfigError
from burnmeter.alerts import Rule
from burnmeter.alerts import rules
from burnmeter.config import Config
from burnmeter.config import ConfigError
from burnmeter.config import Route
from burnmeter.config import load_config
from burnmeter.store import resolve_url

NAMES = frozenset(
    {
        "metering_config",
        "metering_db",
        "metering_key_cache_ttl",
        "metering_journal",
        "metering_journal_max_kb",
        "metering_sweep_seconds",
    }
)
DEFAULT_JOURNAL = "burnmeter.journal"
DEFAULT_JOURNAL_MAX_KB = 256 * 1024
MIN_JOURNAL_MAX_KB = 8


def declare(loader: Any) -> None:
    loader.add_option(
        "metering_config",
        str | None,
        None,
        "burnmeter TOML config file (pools, routes, prices); the built-in default if unset.",
    )
    loader.add_option(
        "metering_db",
        str | None,
        None,
        """
        Store URL: sqlite:///FILE or mongodb://HOST/DB. Unset: $BURNMETER_DB, then the
        config's db, then sqlite:///burnmeter.db.
        """,
    )
    loader.add_option(
        "metering_key_cache_ttl",
        int | None,
        None,
        """
        Seconds an API key look-up is cached (a revoked key stops within this time);
        0 disables the cache. Unset: the config's key_cache_seconds.
        """,
    )
    loader.add_option(
        "metering_journal",
        str | None,
        None,
        """
        Write-ahead journal of settlements not yet in the store (one process per file).
        Unset: FILE.journal next to a sqlite:///FILE store, else ./burnmeter.journal.
        """,
    )
    loader.add_option(
        "metering_journal_max_kb",
        int,
        DEFAULT_JOURNAL_MAX_KB,
        """
        Size limit of the journal in KiB: while the store is unreachable, new metered
        requests are refused (503) before the journal reaches it.
        """,
    )
    loader.add_option(
        "metering_sweep_seconds",
        int | None,
        None,
        """
        Age in seconds after which an unsettled hold is released (it must exceed the
        longest request). Unset: the config's hold_sweep_minutes.
        """,
    )


@dataclass(frozen=True, slots=True)
class Settings:
    config: Config
    db_url: str
    key_cache_ttl: int
    journal_path: str
    journal_max_bytes: int
    sweep_age: timedelta
    upstream_keys: dict[Route, str]
    alert_rules: tuple[Rule, ...] = ()


def default_journal(db_url: str) -> str:
    """FILE.journal next to a sqlite:///FILE store, else ./burnmeter.journal."""
    if db_url.startswith("sqlite://"):
        path = db_url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path  # as open_store reads it
        if path:
            return path + ".journal"
    return DEFAULT_JOURNAL


def read_settings(options: Any) -> Settings:
    """Validate the options once; ``OptionsError`` names the bad one."""
    try:
        config = load_config(options.metering_config)
    except ConfigError as e:
        raise exceptions.OptionsError(f"metering_config: {e}") from None
    ttl = options.metering_key_cache_ttl
    if ttl is None:
        ttl = config.key_cache_seconds
    if ttl < 0:
        raise exceptions.OptionsError("metering_key_cache_ttl: must be 0 or more seconds")
    if options.metering_journal_max_kb < MIN_JOURNAL_MAX_KB:
        raise exceptions.OptionsError(
            f"metering_journal_max_kb: must be at least {MIN_JOURNAL_MAX_KB}"
        )
    sweep = options.metering_sweep_seconds
    if sweep is not None and sweep < 1:
        raise exceptions.OptionsError("metering_sweep_seconds: must be at least 1")
    upstream_keys = {}
    for i, route in enumerate(config.routes):
        if route.upstream_key_env is None:
            continue
        key = os.environ.get(route.upstream_key_env)
        if not key:
            raise exceptions.OptionsError(
                f"metering_config: routes.{i}.upstream_key_env: ${route.upstream_key_env} is not set"
            )
        upstream_keys[route] = key
    try:
        alert_rules = rules(config, os.environ)
    except AlertConfigError as e:
        raise exceptions.OptionsError(f"metering_config: {e}") from None
    db_url = resolve_url(options.metering_db, config.db)
    return Settings(
        config=config,
        db_url=db_url,
        key_cache_ttl=ttl,
        journal_path=options.metering_journal or default_journal(db_url),
        journal_max_bytes=options.metering_journal_max_kb * 1024,
        sweep_age=timedelta(seconds=sweep if sweep is not None else config.hold_sweep_minutes * 60),
        upstream_keys=upstream_keys,
        alert_rules=alert_rules,
    )
