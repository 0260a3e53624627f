"""The addon's options (``addons/options.py``): declared on a mitmproxy loader, read into
``Settings`` with ``taddons.context()``, and the names of options that do not exist.

How the running addon reacts to them (a refused change keeps the store, a start-up error
ends the process) is ``Metering.configure``'s, tested in test_addon_metering.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons import options
from addons.metrics import MetricsAddon
from burnmeter.config import load_config
from burnmeter.exceptions import StoreURLError
from burnmeter.journal import DEFAULT_MAX_BYTES
from tests.addon_support import CONFIG


class Declared:
    """An addon that only declares the options, as ``Metering.load`` does."""

    def load(self, loader: Any) -> None:
        options.declare(loader)


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("BURNMETER_DB", "BURNMETER_CONFIG", "BM_TEST_UPSTREAM", "BM_TEST_HOOK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./burnmeter.toml found by accident
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def tctx(config_path: Path) -> Iterator[taddons.context]:
    with taddons.context(Declared()) as tctx:
        tctx.options.update(metering_config=str(config_path))
        yield tctx


def with_config(path: Path, extra: str) -> None:
    """The test config with ``extra``: top-level keys first, tables (``[...]``) last."""
    path.write_text(CONFIG + extra if extra.startswith("[") else extra + CONFIG)


# -- declared ----------------------------------------------------------------------------------
def test_every_name_is_declared_with_its_default(tctx: taddons.context) -> None:
    declared = {name for name in tctx.options.keys() if name.startswith("metering_")}
    assert declared == options.NAMES
    assert tctx.options.metering_journal_max_kb * 1024 == DEFAULT_MAX_BYTES
    assert tctx.options.metering_durable is False
    unset = options.NAMES - {"metering_journal_max_kb", "metering_durable", "metering_config"}
    assert all(getattr(tctx.options, name) is None for name in unset), "unset: the config's"


# -- read into Settings -------------------------------------------------------------------------
def test_unset_options_take_the_configs_values(tctx: taddons.context, config_path: Path) -> None:
    with_config(config_path, 'db = "sqlite:///from-config.db"\nhold_sweep_minutes = 7\n')
    settings = options.read_settings(tctx.options)
    config = load_config(config_path)
    assert settings.config == config and settings.config_source.path == str(config_path)
    assert settings.db_url == "sqlite:///from-config.db"
    assert settings.key_cache_ttl == config.key_cache_seconds
    assert settings.sweep_age == timedelta(minutes=config.hold_sweep_minutes)
    assert settings.journal_max_bytes == DEFAULT_MAX_BYTES
    assert settings.journal_path == options.default_journal(
        settings.db_url, options.listen_spec(tctx.options)
    )
    assert (settings.upstream_keys, settings.alert_rules, settings.durable) == ({}, (), False)


def test_set_options_win(tctx: taddons.context, tmp_path: Path) -> None:
    tctx.options.update(
        metering_db=f"sqlite:///{tmp_path / 'opt.db'}",
        metering_key_cache_ttl=0,
        metering_journal=str(tmp_path / "mine.journal"),
        metering_journal_max_kb=options.MIN_JOURNAL_MAX_KB,
        metering_durable=True,
        metering_sweep_seconds=1,
    )
    settings = options.read_settings(tctx.options)
    assert settings.db_url == f"sqlite:///{tmp_path / 'opt.db'}"
    assert settings.key_cache_ttl == 0, "0: no cache"
    assert settings.journal_path == str(tmp_path / "mine.journal")
    assert settings.journal_max_bytes == options.MIN_JOURNAL_MAX_KB * 1024
    assert settings.sweep_age == timedelta(seconds=1)
    assert settings.durable is True


def test_the_store_url_comes_from_the_environment_before_the_config(
    tctx: taddons.context, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_config(config_path, 'db = "sqlite:///from-config.db"\n')
    monkeypatch.setenv("BURNMETER_DB", "sqlite:///from-env.db")
    assert options.read_settings(tctx.options).db_url == "sqlite:///from-env.db"
    tctx.options.update(metering_db="sqlite:///from-option.db")
    assert options.read_settings(tctx.options).db_url == "sqlite:///from-option.db"


def test_the_same_options_read_the_same_settings(tctx: taddons.context) -> None:
    """``Metering.configure`` reopens nothing when the settings did not change."""
    assert options.read_settings(tctx.options) == options.read_settings(tctx.options)


@pytest.mark.parametrize(
    "name, refused, accepted, message",
    [
        ("metering_key_cache_ttl", -1, 0, "metering_key_cache_ttl: must be 0 or more seconds"),
        (
            "metering_journal_max_kb",
            options.MIN_JOURNAL_MAX_KB - 1,
            options.MIN_JOURNAL_MAX_KB,
            f"metering_journal_max_kb: must be at least {options.MIN_JOURNAL_MAX_KB}",
        ),
        ("metering_sweep_seconds", 0, 1, "metering_sweep_seconds: must be at least 1"),
    ],
)
def test_a_bound_is_refused_below_and_taken_at_its_limit(
    tctx: taddons.context, name: str, refused: int, accepted: int, message: str
) -> None:
    tctx.options.update(**{name: refused})
    with pytest.raises(exceptions.OptionsError) as e:
        options.read_settings(tctx.options)
    assert str(e.value) == message
    tctx.options.update(**{name: accepted})
    options.read_settings(tctx.options)


@pytest.mark.parametrize(
    "extra, message",
    [
        ("log_ttl_days = -1\n", "metering_config: .*log_ttl_days"),
        ("[oops\n", "metering_config: "),
        (
            '[[alerts]]\nkind = "balance_below"\nthreshold = 1\nwebhook_env = "BM_TEST_HOOK"\n',
            r"metering_config: alerts.0.webhook_env: \$BM_TEST_HOOK is not set",
        ),
    ],
)
def test_a_bad_config_is_an_options_error_naming_metering_config(
    tctx: taddons.context, config_path: Path, extra: str, message: str
) -> None:
    with_config(config_path, extra)
    with pytest.raises(exceptions.OptionsError, match=message) as e:
        options.read_settings(tctx.options)
    assert e.value.__cause__ is None and e.value.__suppress_context__, "one line, no chain"


def test_a_missing_config_file_is_named(tctx: taddons.context, config_path: Path) -> None:
    tctx.options.update(metering_config=str(config_path) + ".missing")
    with pytest.raises(exceptions.OptionsError, match=r"^metering_config: .*\.missing: No such"):
        options.read_settings(tctx.options)


def test_the_alert_webhooks_are_read_from_the_environment(
    tctx: taddons.context, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_config(
        config_path,
        '[[alerts]]\nkind = "balance_below"\nthreshold = 1\nwebhook_env = "BM_TEST_HOOK"\n',
    )
    monkeypatch.setenv("BM_TEST_HOOK", "https://hooks.test/x")
    (rule,) = options.read_settings(tctx.options).alert_rules
    assert rule.url == "https://hooks.test/x"


def test_each_routes_upstream_key_is_read_from_its_variable(
    tctx: taddons.context, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = CONFIG.replace("multiplier = 2\n", 'multiplier = 2\nupstream_key_env = "BM_A"\n', 1)
    text = text.replace(
        'pool = "openhands"\n\n', 'pool = "openhands"\nupstream_key_env = "BM_B"\n\n'
    )
    config_path.write_text(text)
    monkeypatch.setenv("BM_A", "sk-up-a")
    monkeypatch.setenv("BM_B", "sk-up-b")
    settings = options.read_settings(tctx.options)
    routes = {route.upstream_key_env: route for route in settings.config.routes}
    assert settings.upstream_keys == {routes["BM_A"]: "sk-up-a", routes["BM_B"]: "sk-up-b"}
    monkeypatch.setenv("BM_B", "")  # set but empty: no key either
    index = settings.config.routes.index(routes["BM_B"])
    with pytest.raises(exceptions.OptionsError) as e:
        options.read_settings(tctx.options)
    assert str(e.value) == f"metering_config: routes.{index}.upstream_key_env: $BM_B is not set"


def test_a_sqlite_url_without_a_file_is_named_as_metering_db(tctx: taddons.context) -> None:
    tctx.options.update(metering_db="sqlite://")
    with pytest.raises(exceptions.OptionsError, match="^metering_db: sqlite://: no file path"):
        options.read_settings(tctx.options)


# -- the journal's name --------------------------------------------------------------------------
def listening(*modes: str, host: str = "", port: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(mode=list(modes), listen_host=host, listen_port=port)


@pytest.mark.parametrize(
    "where, spec",
    [
        (listening("regular", port=9000), "9000"),
        (listening("regular", host="127.0.0.1", port=9000), "127.0.0.1-9000"),
        (listening("reverse:http://b@8005", "reverse:http://a@8004"), "8004+8005"),
        (listening("regular", host="fe80::1%eth0", port=1), "fe80__1_eth0-1"),
        (listening("not a mode", "regular", port=9000), "9000"),  # mitmproxy refuses it
        (listening("not a mode"), "proxy"),
        (listening(), "proxy"),
    ],
)
def test_listen_spec(where: SimpleNamespace, spec: str) -> None:
    assert options.listen_spec(where) == spec


@pytest.mark.parametrize(
    "db_url, stem",
    [
        ("sqlite:///data/burn.db", "data/burn.db"),
        ("sqlite:////abs/burn.db", "/abs/burn.db"),
        ("mongodb://db.test/fproxy", options.JOURNAL_STEM),
    ],
)
def test_journal_names_follow_the_store(db_url: str, stem: str) -> None:
    assert options.default_journal(db_url, "8080") == f"{stem}.8080.journal"
    assert options.legacy_journal(db_url) == f"{stem}.journal"
    assert options.legacy_journal(db_url) != options.default_journal(db_url, "8080")


def test_journal_names_of_a_sqlite_url_without_a_file_raise() -> None:
    with pytest.raises(StoreURLError):
        options.default_journal("sqlite://", "8080")
    with pytest.raises(StoreURLError):
        options.legacy_journal("sqlite://")


# -- names that are no option ------------------------------------------------------------------
def test_unknown_options_names_the_closest_and_skips_other_addons_names() -> None:
    assert options.unknown_options(["metering_jornal", "mode_x", "web_port"]) == [
        "metering_jornal: no such option (did you mean metering_journal?)"
    ]


def test_unknown_options_are_sorted_and_list_the_options_when_nothing_is_close() -> None:
    far = "metering_" + "z" * 20
    messages = options.unknown_options([far, "metering_dbb"])
    assert messages == [
        "metering_dbb: no such option (did you mean metering_db?)",
        f"{far}: no such option (options: {', '.join(sorted(options.NAMES | options.METRICS_NAMES))})",
    ]


def test_unknown_options_of_nothing_is_nothing() -> None:
    assert options.unknown_options([]) == []


def test_a_typo_of_a_metrics_option_is_pointed_at_it() -> None:
    with taddons.context(MetricsAddon(metering=None)) as tctx:  # type: ignore[arg-type]
        metrics = {name for name in tctx.options.keys() if name.startswith("metering_metrics")}
    assert metrics, "the metrics addon declares its options"
    for name in sorted(metrics):
        typo = name[:-2] + name[-1]  # one letter left out
        (message,) = options.unknown_options([typo])
        assert message == f"{typo}: no such option (did you mean {name}?)"
