"""The addon's mitmproxy options, and their validation into typed ``Settings``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mitmproxy import exceptions

from burnmeter.config import Config
from burnmeter.config import ConfigError
from burnmeter.config import Route
from burnmeter.config import load_config
from burnmeter.store import resolve_url

NAMES = frozenset(
    {"metering_config", "metering_db", "metering_key_cache_ttl", "metering_queue_size"}
)


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
        "metering_queue_size",
        int,
        10_000,
        """
        Settlements waiting for the store, at most. New metered requests are refused (503)
        while it is half full.
        """,
    )


@dataclass(frozen=True, slots=True)
class Settings:
    config: Config
    db_url: str
    key_cache_ttl: int
    queue_size: int
    upstream_keys: dict[Route, str]


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
    if options.metering_queue_size < 2:
        raise exceptions.OptionsError("metering_queue_size: must be at least 2")
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
    return Settings(
        config=config,
        db_url=resolve_url(options.metering_db, config.db),
        key_cache_ttl=ttl,
        queue_size=options.metering_queue_size,
        upstream_keys=upstream_keys,
    )
