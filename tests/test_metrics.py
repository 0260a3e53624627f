"""The metrics addon: options, counting from the hooks, gauges, readiness, the HTTP server."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from addon_support import alice_store
from addon_support import json_response
from addon_support import make_flow
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addons import metrics as metrics_module
from addons.metering import Metering
from addons.metrics import MAX_MODEL_LABEL
from addons.metrics import MAX_MODELS
from addons.metrics import Metrics
from addons.metrics import MetricsAddon
from addons.metrics import ReadinessCheck
from addons.metrics import observed
from addons.metrics import parse_address
from scripts.processes import free_port

CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}


class Env:
    def __init__(self, metering: Metering, addon: MetricsAddon, tctx: taddons.context) -> None:
        self.metering = metering
        self.addon = addon
        self.tctx = tctx

    @property
    def metrics(self) -> Metrics:
        assert self.metering.metrics is not None
        return self.metering.metrics

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    config_path, db_url, store = alice_store(tmp_path, creditsNew=Decimal(5), credits=Decimal(3))
    store.close()
    metering = Metering()
    addon = MetricsAddon(metering)
    with taddons.context(metering, addon) as tctx:
        tctx.configure(metering, metering_config=str(config_path), metering_db=db_url)
        tctx.configure(addon, metering_metrics=f"127.0.0.1:{free_port()}")
        yield Env(metering, addon, tctx)
        addon.done()
        metering.done()


@pytest.mark.parametrize(
    "text, address",
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464)), ("h:1", ("h", 1))],
)
def test_parse_address(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["9464", ":9464", "host:", "host:0", "host:65536", "host:x"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_address(text)


def test_bad_option_is_one_line(env: Env) -> None:
    with pytest.raises(exceptions.OptionsError, match="metering_metrics: 'nope' is not HOST:PORT"):
        env.tctx.configure(env.addon, metering_metrics="nope")


def test_a_busy_port_is_an_options_error(env: Env) -> None:
    assert env.addon.server is not None
    busy = f"127.0.0.1:{env.addon.server.port}"
    other = MetricsAddon(env.metering)
    with taddons.context(other) as tctx:
        with pytest.raises(exceptions.OptionsError, match="metering_metrics: 127.0.0.1:.*in use"):
            tctx.configure(other, metering_metrics=busy)


def test_off_by_default_and_turned_off(env: Env) -> None:
    env.tctx.configure(env.addon, metering_metrics=None)
    assert env.metering.metrics is None and env.addon.server is None


def test_server_answers_metrics_health_and_readiness(env: Env) -> None:
    assert env.addon.server is not None
    base = f"http://127.0.0.1:{env.addon.server.port}"
    scrape = httpx.get(base + "/metrics")
    assert scrape.status_code == 200
    assert "burnmeter_journal_backlog 0.0" in scrape.text
    assert scrape.headers["content-type"].startswith("text/plain")
    assert httpx.get(base + "/healthz").json() == {"status": "ok"}
    assert httpx.get(base + "/readyz?verbose").json() == {"ready": True, "reasons": []}
    assert httpx.get(base + "/metrics/../x").status_code == 404


async def test_a_charged_request_is_counted_from_its_settlement(env: Env) -> None:
    await charged(env)
    labels = {"pool": "openhands", "api": "openai.chat", "outcome": "charged", "code": "200"}
    assert env.sample("burnmeter_requests_total", **labels) == 1
    cost = Decimal(1000 * 2.5 + 200 * 10) / 1_000_000 * 2  # the route's multiplier
    model = {"pool": "openhands", "model": "gpt-4o"}
    assert env.sample("burnmeter_cost_usd_total", **model) == pytest.approx(float(cost))
    assert env.sample("burnmeter_tokens_total", **model, kind="input") == 1000
    assert env.sample("burnmeter_tokens_total", **model, kind="output") == 200
    assert env.sample("burnmeter_tokens_total", **model, kind="reasoning") is None
    assert env.sample("burnmeter_overhead_seconds_count") == 1
    assert env.sample("burnmeter_hold_seconds_count") == 1
    assert env.sample("burnmeter_ttft_seconds_count") == 0  # not streamed


async def test_rejections_and_passthrough_are_counted_with_their_status(env: Env) -> None:
    for f in (make_flow(key=None), make_flow(key="sk-unknown-000000000000")):
        await env.tctx.cycle(env.metering, f)
    free = make_flow("/v1/models")
    free.request.method = "GET"
    await env.metering.requestheaders(free)
    await env.metering.request(free)
    free.response = json_response({"data": []}, status=200)
    env.metering.responseheaders(free)
    env.metering.response(free)
    rejected = {"pool": "", "api": "", "outcome": "rejected", "code": "401"}
    assert env.sample("burnmeter_requests_total", **rejected) == 2
    passed = {"pool": "openhands", "api": "", "outcome": "passthrough", "code": "200"}
    assert env.sample("burnmeter_requests_total", **passed) == 1
    assert env.sample("burnmeter_hold_seconds_count") == 0
    assert env.sample("burnmeter_overhead_seconds_count") == 3


async def charged(env: Env) -> None:
    f = make_flow()
    await env.metering.requestheaders(f)
    await env.metering.request(f)
    f.response = json_response({"model": "gpt-4o", "usage": CHAT_USAGE})
    env.metering.responseheaders(f)
    env.metering.response(f)


async def test_user_label_only_on_request(env: Env) -> None:
    await charged(env)
    assert "user" not in {
        k for m in env.metrics.registry.collect() for s in m.samples for k in s.labels
    }
    env.tctx.configure(env.addon, metering_metrics_users=True)
    await charged(env)
    labels = {"pool": "openhands", "api": "openai.chat", "code": "200", "user": "alice"}
    assert env.sample("burnmeter_requests_total", **labels, outcome="charged") == 1
    assert env.sample("burnmeter_cost_usd_total", pool="openhands", model="gpt-4o", user="alice")


def test_models_past_the_bound_share_one_label(env: Env) -> None:
    names = [env.metrics._model(f"model-{i}") for i in range(MAX_MODELS + 5)]
    assert names[:MAX_MODELS] == [f"model-{i}" for i in range(MAX_MODELS)]
    assert set(names[MAX_MODELS:]) == {"other"}
    assert env.metrics._model("model-3") == "model-3"


def test_a_long_model_name_is_no_label(env: Env) -> None:
    assert env.metrics._model("m" * (MAX_MODEL_LABEL + 1)) == "other"
    assert env.metrics._model("m" * MAX_MODEL_LABEL) == "m" * MAX_MODEL_LABEL


def test_gauges_read_the_running_addon(env: Env) -> None:
    env.metrics.refresh_balances()
    assert env.sample("burnmeter_pool_balance_usd", pool="openhands") == 5
    assert env.sample("burnmeter_pool_balance_usd", pool="ohmygpt") == 3
    assert env.sample("burnmeter_store_up") == 1
    assert env.sample("burnmeter_in_flight") == 0
    assert env.sample("burnmeter_settlements_unjournaled_total") == 0
    env.metering.unjournaled = 2
    assert env.sample("burnmeter_settlements_unjournaled_total") == 2


def test_readiness_reports_a_write_locked_store(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "PROBE_TIMEOUT", 0.05)
    settings = env.metering.settings
    assert settings is not None
    check = ReadinessCheck(env.metering)
    lock = sqlite3.connect(settings.db_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        answer = check._check()
        assert not answer.ready
        assert answer.reasons[0].startswith("store: ")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert check._check().ready
    check.close()


def test_readiness_reports_the_backlog(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "READY_MAX_BACKLOG", -1)
    answer = ReadinessCheck(env.metering).check()
    assert answer.reasons == ("journal: 0 settlements waiting",)


def test_readiness_before_configuration() -> None:
    answer = ReadinessCheck(Metering()).check()
    assert (answer.ready, answer.reasons) == (False, ("metering is not configured",))


async def test_observed_passes_through_without_metrics() -> None:
    class Hooks:
        metrics = None

        @observed
        def response(self, f: object) -> str:
            return "sync"

        @observed
        async def request(self, f: object) -> str:
            return "async"

    assert Hooks().response(None) == "sync"
    assert await Hooks().request(None) == "async"


async def test_requests_in_flight_and_their_holds(env: Env) -> None:
    f = make_flow()
    await env.metering.requestheaders(f)
    await env.metering.request(f)
    assert (env.sample("burnmeter_in_flight"), env.sample("burnmeter_holds_open")) == (1, 1)
    f.response = json_response({"model": "gpt-4o", "usage": CHAT_USAGE})
    env.metering.responseheaders(f)
    env.metering.response(f)
    assert (env.sample("burnmeter_in_flight"), env.sample("burnmeter_holds_open")) == (0, 0)
