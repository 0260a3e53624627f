"""``burnmeter reprice`` through click, on SQLite and MongoDB, over logs priced from the corpus."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from burnmeter.config import load_config
from burnmeter.documents import request_log
from burnmeter.exceptions import UnknownModelError
from burnmeter.pricing import billing_tokens
from burnmeter.pricing import cost
from burnmeter.pricing import resolve_price
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from stats.reprice import recompute
from tests.cli_backends import Backend
from tests.cli_backends import backend_fixture  # noqa: F401
from tests.corpus import load_cases
from tests.corpus import read_usage
from tests.test_price_model import request_model

HOST = "chat.example"
CONFIG = f"""
unknown_model = "list-price"
log_ttl_days = 0

[[routes]]
host = "{HOST}"
pool = "openhands"
multiplier = 1.15
"""
CREATED = datetime(2025, 3, 1, tzinfo=UTC)
ALL = ["--period", "all", "--format", "json"]


def corpus_logs(config_path: Path) -> list[Settlement]:
    """One settlement per corpus case with usage, priced as the proxy prices it."""
    config = load_config(config_path)
    settlements = []
    for name, case in load_cases().items():
        usage = read_usage(case)
        if usage is None:
            continue
        url = f"https://{case['request']['host']}{case['request']['path']}"
        try:
            quote = resolve_price(config, request_model(case), Decimal("1.15"), upstream_url=url)
        except UnknownModelError:
            continue
        log = request_log(
            request_id=name,
            user_id="alice",
            key_mask="sk-ali…ice",
            model=quote.model,
            usage=usage,
            cost=cost(usage, quote),
            billing_tokens=billing_tokens(usage, quote),
            pool="openhands",
            status_code=200,
            latency_ms=100,
            ttft_ms=None,
            host=HOST,
            upstream=case["request"]["host"],
            path=case["request"]["path"],
            stream=case["stream"],
            created_at=CREATED,
            route_multiplier=quote.route_multiplier,
        )
        settlements.append(
            Settlement(name, "alice", "openhands", log["creditsCost"], 0, 0, 0, None, log)
        )
    return settlements


@pytest.fixture
def filled(backend: Backend, tmp_path: Path) -> tuple[Backend, Path, int]:
    if not load_cases():
        pytest.skip("no corpus")
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(CONFIG)
    store: Store = backend.store()
    store.ensure_schema(0)
    store.create_user("alice", "sk-alice", {"creditsNew": Decimal(100)})
    settlements = corpus_logs(config_path)
    store.settle(settlements)
    return backend, config_path, len(settlements)


NANO = Decimal("1e-9")


def usd(value: object) -> Decimal:
    """A JSON number or string of the output as the exact decimal it was printed as."""
    return Decimal(str(value))


def rows(backend: Backend, config: Path, *args: str) -> list[dict[str, Any]]:
    result = backend.run("--config", str(config), "reprice", *args)
    assert result.exit_code == 0, result.output
    parsed: list[dict[str, Any]] = json.loads(result.output)
    return parsed


def test_the_corpus_repriced_at_the_prices_it_was_charged_shows_no_difference(
    filled: tuple[Backend, Path, int],
) -> None:
    backend, config, count = filled
    repriced = rows(backend, config, *ALL)
    assert sum(row["requests"] for row in repriced) == count > 40
    assert all(usd(row["difference"]) == 0 for row in repriced)
    assert sum(usd(row["logged"]) for row in repriced) > 0
    assert all(row["unpriced"] == 0 for row in repriced)


def test_a_price_change_shows_per_model(filled: tuple[Backend, Path, int]) -> None:
    backend, config, _ = filled
    before = {row["model"]: row for row in rows(backend, config, *ALL)}
    # the operator now prices gpt-4o-mini at twice its list rates
    twice = '[models."gpt-4o-mini"]\nlist_price = "gpt-4o-mini"\ninput = 0.3\noutput = 1.2\n'
    config.write_text(CONFIG + twice + "cache_read = 0.15\n")
    after = {row["model"]: row for row in rows(backend, config, *ALL)}
    mini = after["gpt-4o-mini"]
    # each log is rounded to the nano-dollar once: twice the rates is twice the sum to n nanos
    doubled = 2 * usd(before["gpt-4o-mini"]["logged"])
    assert abs(usd(mini["recomputed"]) - doubled) <= mini["requests"] * NANO
    assert usd(mini["difference"]) == usd(mini["recomputed"]) - usd(mini["logged"]) > 0
    assert list(after)[0] == "gpt-4o-mini"  # the largest difference first
    others = [row for model, row in after.items() if model != "gpt-4o-mini"]
    assert others and all(usd(row["difference"]) == 0 for row in others)


def test_reprice_formats_and_window(filled: tuple[Backend, Path, int]) -> None:
    backend, config, _ = filled
    table = backend.run("--config", str(config), "reprice", "--period", "all")
    assert table.exit_code == 0 and "recomputed" in table.output and "gpt-4o-mini" in table.output
    text = backend.run("--config", str(config), "reprice", "--period", "all", "--format", "csv")
    parsed = list(csv.DictReader(io.StringIO(text.output)))
    assert parsed and set(parsed[0]) == {
        "model", "requests", "logged", "recomputed", "difference", "unpriced"
    }  # fmt: skip
    # the logs are from March 2025: a window ending before them is empty
    early = ["--since", "2025-01-01T00:00Z", "--until", "2025-02-01T00:00Z", "--format", "json"]
    assert rows(backend, config, *early) == []


def test_a_log_without_a_route_multiplier_is_repriced_at_its_hosts_route(tmp_path: Path) -> None:
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(CONFIG + '[models."m"]\ninput = 1.0\noutput = 2.0\n')
    config = load_config(config_path)
    log = {"model": "m", "inputTokens": 1_000_000, "outputTokens": 1_000_000, "host": HOST}
    assert recompute(config, log) == Decimal("3.45")  # 3 x the route's 1.15
    assert recompute(config, {**log, "host": f"{HOST}:443"}) == Decimal("3.45")
    assert recompute(config, {**log, "host": "elsewhere.example"}) == Decimal(3)
    assert recompute(config, {**log, "routeMultiplier": "2"}) == Decimal(6)
    assert recompute(config, {**log, "usageSource": "none"}) == 0
    assert recompute(config, {**log, "model": None}) is None  # a legacy log without a model
    assert recompute(config, {**log, "model": "no-such-model-xyz"}) is None
