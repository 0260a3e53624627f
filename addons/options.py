"""The addon's mitmproxy options, and their validation into typed ``Settings``."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode

from burnmeter.alerts import Rule
from burnmeter.alerts import rules
from burnmeter.config import Config
from burnmeter.config import ConfigSource
from burnmeter.config import Route
from burnmeter.config import find_config
from burnmeter.config import load_config
from burnmeter.exceptions import AlertConfigError
from burnmeter.exceptions import ConfigError
from burnmeter.exceptions import StoreURLError
from burnmeter.journal import DEFAULT_MAX_BYTES
from burnmeter.store import resolve_url
from burnmeter.store import sqlite_path

NAMES = frozenset(
    {
        "metering_config",
        "metering_db",
        "metering_key_cache_ttl",
        "metering_journal",
        "metering_journal_max_kb",
        "metering_durable",
        "metering_sweep_seconds",
    }
)
"""The metering addon's options (``declare``)."""
METRICS_NAMES = frozenset({"metering_metrics", "metering_metrics_users"})
"""The metrics addon's options (``addons/metrics.py`` declares them)."""
JOURNAL_STEM = "burnmeter"
"""The journal's name stem when the store is not a file (MongoDB)."""
DEFAULT_JOURNAL_MAX_KB = DEFAULT_MAX_BYTES // 1024
MIN_JOURNAL_MAX_KB = 8


def declare(loader: Any) -> None:
    loader.add_option(
        "metering_config",
        str | None,
        None,
        """
        burnmeter TOML config file (pools, routes, prices). Unset: $BURNMETER_CONFIG, then
        ./burnmeter.toml if it exists, then the built-in config.
        """,
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
        Unset: named after the store and this process's listen addresses, e.g.
        FILE.8080.journal next to a sqlite:///FILE store (else ./burnmeter.8080.journal),
        so that processes on one store never share one and a restart finds its own.
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
        "metering_durable",
        bool,
        False,
        """
        fsync each journaled settlement before the end of its response reaches the client
        (concurrent settlements share one fsync), and commit the SQLite store with
        synchronous=FULL: a power cut then loses no charge of an answer a client received.
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
    config_source: ConfigSource
    db_url: str
    key_cache_ttl: int
    journal_path: str
    journal_max_bytes: int
    sweep_age: timedelta
    upstream_keys: dict[Route, str]
    alert_rules: tuple[Rule, ...] = ()
    durable: bool = False


def listen_spec(options: Any) -> str:
    """This process's listen addresses as a file-name part: ``8080``, ``127.0.0.1-8004+8005``.

    Two processes cannot listen on one address, and a restart listens where it did."""
    addresses = []
    for spec in options.mode:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue  # mitmproxy refuses a bad mode itself
        host, port = mode.listen_host(options.listen_host), mode.listen_port(options.listen_port)
        addresses.append(f"{host}-{port}" if host else str(port))
    return re.sub(r"[^A-Za-z0-9.+-]", "_", "+".join(sorted(addresses)) or "proxy")


def default_journal(db_url: str, listen: str) -> str:
    """FILE.LISTEN.journal next to a sqlite:///FILE store, else ./burnmeter.LISTEN.journal."""
    path = sqlite_path(db_url)
    return f"{path or JOURNAL_STEM}.{listen}.journal"


def legacy_journal(db_url: str) -> str:
    """Where an earlier version kept the default journal (FILE.journal, ./burnmeter.journal)."""
    return f"{sqlite_path(db_url) or JOURNAL_STEM}.journal"


def unknown_options(names: Iterable[str]) -> list[str]:
    """A message for each ``metering_*`` name that is no option, with the closest one."""
    messages = []
    for name in sorted(n for n in names if n.startswith("metering")):
        known = NAMES | METRICS_NAMES
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"options: {', '.join(sorted(known))}"
        messages.append(f"{name}: no such option ({hint})")
    return messages


def read_settings(options: Any) -> Settings:
    """Validate the options once; ``OptionsError`` names the bad one."""
    source = find_config(options.metering_config)
    try:
        config = load_config(source.path)
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
    try:
        journal = options.metering_journal or default_journal(db_url, listen_spec(options))
    except StoreURLError as e:
        raise exceptions.OptionsError(f"metering_db: {e}") from None
    return Settings(
        config=config,
        config_source=source,
        db_url=db_url,
        key_cache_ttl=ttl,
        journal_path=journal,
        journal_max_bytes=options.metering_journal_max_kb * 1024,
        sweep_age=timedelta(seconds=sweep if sweep is not None else config.hold_sweep_minutes * 60),
        upstream_keys=upstream_keys,
        alert_rules=alert_rules,
        durable=options.metering_durable,
    )
