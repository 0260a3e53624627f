"""Operating the proxy end to end: metrics, readiness, the usage endpoint, alerts.

One mitmdump of its own (``metering_metrics`` on a free port, user labels on, an
``[[alerts]]`` rule posting to a receiver in this test) in front of the session's fake
upstream. Every wait polls for the state it needs, with a deadline.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from burnmeter.alerts import crossing_id
from burnmeter.config import load_config
from burnmeter.store import open_store
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from scripts.processes import free_port
from stats.cli import cli
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import wait_logs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

THRESHOLD = Decimal("1.0")
ALERTS_TOML = f"""
[[alerts]]
kind = "balance_below"
threshold = {THRESHOLD}
pools = ["openhands"]
webhook_env = "E2E_ALERT_URL"
"""
WAIT = 20.0
MESSAGES: list[Any] = [{"role": "user", "content": "Count."}]
BIG_ANSWER = {"x_chunks": 300, "max_tokens": 300}
"""About $0.0025 a request on openhands (300 output tokens of fake-gpt at $8/M × 1.02); the
limit keeps its hold small enough for 20 of them on one balance."""


# -- a webhook receiver -----------------------------------------------------------------------
class Receiver:
    """Records every POST; answers 500 to the next ``fail`` of them."""

    def __init__(self) -> None:
        self.attempts: list[dict[str, Any]] = []
        self.delivered: list[dict[str, Any]] = []
        self.fail = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.attempts.append(body)
                    failing = receiver.fail > 0
                    receiver.fail -= failing
                    if not failing:
                        receiver.delivered.append(body)
                self.send_response(500 if failing else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/burnmeter?token=s3cret"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def for_user(self, user: str) -> list[dict[str, Any]]:
        with self.lock:
            return [a for a in self.delivered if a["user"] == user]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- the proxy under test ---------------------------------------------------------------------
class Observed:
    def __init__(self, proxy: Proxy, metrics_port: int) -> None:
        self.proxy = proxy
        self.base = f"http://127.0.0.1:{metrics_port}"

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, timeout=5)

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        samples = {}
        for family in text_string_to_metric_families(self.get("/metrics").text):
            for s in family.samples:
                samples[s.name, frozenset(s.labels.items())] = s.value
        return samples

    def value(self, name: str, **labels: str) -> float:
        """Σ of the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.scrape().items() if n == name and want <= ls)

    def wait_until(self, what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} after {WAIT}s:\n{self.proxy.output()[-3000:]}")
            time.sleep(0.05)

    def settled(self) -> None:
        """Every settlement applied and every alert delivered."""
        self.wait_until(
            "settled",
            lambda: (
                self.value("burnmeter_journal_backlog") == 0
                and self.value("burnmeter_alerts_pending") == 0
                and self.value("burnmeter_in_flight") == 0
            ),
        )

    def readyz(self) -> httpx.Response:
        return self.get("/readyz")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def observed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, receiver: Receiver):
    workdir = tmp_path_factory.mktemp("observe")
    config_path = workdir / "burnmeter.toml"
    # without the output cap, a request on what is left of a balance takes it past 0
    config_path.write_text("cap_output_tokens = false\n" + CONFIG_TOML + ALERTS_TOML)
    config_path.chmod(0o600)
    port = free_port()
    proxy = Proxy(
        upstream,
        config_path,
        workdir / "burnmeter.db",
        workdir,
        options={"metering_metrics": f"127.0.0.1:{port}", "metering_metrics_users": "true"},
        env={"E2E_ALERT_URL": receiver.url},
    )
    proxy.start()
    handle = Observed(proxy, port)
    try:
        handle.wait_until("ready", lambda: _status(handle, "/readyz") == 200)
        yield handle
    finally:
        proxy.stop()


def _status(observed: Observed, path: str) -> int | None:
    try:
        return observed.get(path).status_code
    except httpx.TransportError:
        return None


@pytest.fixture(scope="module")
def ostore(observed: Observed) -> Iterator[Store]:
    config = load_config(observed.proxy.config_path)
    opened = open_store(observed.proxy.db_url, config.pools)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def oaccounts(ostore: Store) -> Accounts:
    return Accounts(ostore)


def client(observed: Observed, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=observed.proxy.base_url + "/v1",
        api_key=key,
        default_headers={"Host": OPENHANDS_HOST},
        max_retries=0,
        timeout=20,
    )


def chat(observed: Observed, key: str, **extra: Any) -> None:
    client(observed, key).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, extra_body=extra
    )


def stream(observed: Observed, key: str) -> None:
    chunks = client(observed, key).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, stream=True, extra_body={"x_chunks": 5}
    )
    assert sum(1 for _ in chunks) >= 5


# -- metrics ----------------------------------------------------------------------------------
def test_health_answers(observed: Observed) -> None:
    assert observed.get("/healthz").json() == {"status": "ok"}
    assert observed.readyz().json() == {"ready": True, "reasons": []}
    assert observed.get("/nothing").status_code == 404


def test_counters_equal_the_logs_after_a_mixed_load(
    observed: Observed, ostore: Store, oaccounts: Accounts
) -> None:
    alice = oaccounts.new(creditsNew="50")
    before_401 = observed.value("burnmeter_requests_total", outcome="rejected", code="401")
    for _ in range(3):
        chat(observed, alice.key, x_chunks=7, x_cache_read=3)
    for _ in range(2):
        stream(observed, alice.key)
    raw = httpx.post(  # 200 without a body, so without usage: charged from an estimate
        observed.proxy.base_url + "/v1/chat/completions",
        headers={"Host": OPENHANDS_HOST, "Authorization": f"Bearer {alice.key}"},
        json={"model": "fake-gpt", "messages": MESSAGES, "x_raw": "empty-json"},
        timeout=20,
    )
    assert raw.status_code == 200
    with pytest.raises(openai.BadRequestError):
        client(observed, alice.key).chat.completions.create(
            model="no-such-model", messages=MESSAGES
        )
    with pytest.raises(openai.AuthenticationError):
        chat(observed, oaccounts.unknown_key())
    with pytest.raises(openai.APIStatusError):
        chat(observed, alice.key, x_status=500)  # failed upstream: logged at cost 0
    logs = wait_logs(ostore, alice.user_id, 7)
    observed.settled()

    who = {"user": alice.user_id}
    cost = Decimal(0)
    for log in logs:
        cost += log["creditsCost"]
    assert observed.value("burnmeter_cost_usd_total", **who) == pytest.approx(float(cost), rel=1e-9)
    assert cost > 0
    for kind, field in [
        ("input", "inputTokens"),
        ("output", "outputTokens"),
        ("cache_read", "cacheHitTokens"),
    ]:
        expected = sum(log[field] for log in logs)
        assert observed.value("burnmeter_tokens_total", kind=kind, **who) == expected, kind
    charged = sum(1 for log in logs if log["usageSource"] != "none")
    failed = len(logs) - charged
    assert (charged, failed) == (6, 1)
    assert observed.value("burnmeter_requests_total", outcome="charged", **who) == charged
    assert observed.value("burnmeter_requests_total", outcome="failed", code="500", **who) == failed
    assert observed.value("burnmeter_requests_total", outcome="rejected", code="400", **who) == 1
    assert (
        observed.value("burnmeter_requests_total", outcome="rejected", code="401") == before_401 + 1
    )
    estimated = sum(1 for log in logs if log["usageSource"] == "estimated")
    assert estimated == 1
    assert observed.value("burnmeter_estimated_total", **who) == estimated
    # nothing waits in the journal, nothing was set aside or lost
    journal = observed.proxy.journal_path
    assert journal.stat().st_size == 0
    assert not Path(str(journal) + ".rejected").exists()
    assert observed.value("burnmeter_journal_backlog") == 0
    assert observed.value("burnmeter_settlements_set_aside_total") == 0
    assert observed.value("burnmeter_settlements_unjournaled_total") == 0
    assert observed.value("burnmeter_overhead_seconds_count") >= 9
    assert observed.value("burnmeter_ttft_seconds_count") >= 2
    assert observed.value("burnmeter_hold_seconds_count") >= 7


def test_pool_balance_gauge_sums_the_store(observed: Observed) -> None:
    assert observed.value("burnmeter_store_up") == 1
    samples = [k for k in observed.scrape() if k[0] == "burnmeter_pool_balance_usd"]
    assert {dict(labels)["pool"] for _, labels in samples} == {"openhands", "ohmygpt"}


# -- readiness --------------------------------------------------------------------------------
def test_readyz_is_503_while_the_sqlite_file_is_write_locked(observed: Observed) -> None:
    lock = sqlite3.connect(observed.proxy.db_path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        observed.wait_until("unready", lambda: observed.readyz().status_code == 503)
        answer = observed.readyz().json()
        assert answer["ready"] is False
        assert any(reason.startswith("store: ") for reason in answer["reasons"]), answer
        assert observed.get("/healthz").status_code == 200  # the process still runs
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    observed.wait_until("ready again", lambda: observed.readyz().status_code == 200)


# -- the usage endpoint -----------------------------------------------------------------------
def run_cli(observed: Observed, *args: str) -> Any:
    proxy = observed.proxy
    base = ["--db", proxy.db_url, "--config", str(proxy.config_path)]
    result = CliRunner().invoke(cli, [*base, *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def usage(observed: Observed, headers: dict[str, str]) -> httpx.Response:
    return httpx.get(
        observed.proxy.base_url + "/burnmeter/usage",
        headers={"Host": OPENHANDS_HOST, **headers},
        timeout=10,
    )


def test_usage_endpoint_matches_the_cli(
    observed: Observed, ostore: Store, oaccounts: Accounts, upstream: Upstream
) -> None:
    bob = oaccounts.new(creditsNew="7.5", credits="2", refCredits="0.25")
    for _ in range(3):
        chat(observed, bob.key, x_chunks=11)
    wait_logs(ostore, bob.user_id, 3)
    observed.settled()
    before = upstream.stats()["requests"]
    answer = usage(observed, {"Authorization": f"Bearer {bob.key}"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert upstream.stats()["requests"] == before  # answered by the proxy

    shown = run_cli(observed, "accounts", "show", bob.user_id)
    assert body["user"] == bob.user_id
    assert body["balances"] == pytest.approx(shown["balances"])
    rows = [r for r in run_cli(observed, "users", "--period", "24h") if r["user"] == bob.user_id]
    assert body["spent"]["24h"] == pytest.approx(sum(r["cost"] for r in rows))
    assert body["requests"] == {"24h": sum(r["requests"] for r in rows)} == {"24h": 3}
    assert body["spent"]["1h"] == body["spent"]["7d"] == body["spent"]["30d"] > 0
    assert body["expires"] == {"openhands": None, "ohmygpt": None}
    # Anthropic clients send x-api-key
    assert usage(observed, {"x-api-key": bob.key}).json()["user"] == bob.user_id


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-not-a-key-0000"}, {"x-api-key": "sk-wrong-0000000"}],
)
def test_usage_endpoint_needs_a_key(observed: Observed, upstream: Upstream, headers) -> None:
    before = upstream.stats()["requests"]
    answer = usage(observed, headers)
    assert answer.status_code == 401
    assert "error" in answer.json()
    assert upstream.stats()["requests"] == before


# -- alerts -----------------------------------------------------------------------------------
def crossing_log(logs: list[Document], alert: dict[str, Any]) -> Document:
    """The log whose settlement the alert's id names."""
    level = Decimal(str(alert["threshold"]))
    found = [
        log
        for log in logs
        if crossing_id(alert["user"], alert["pool"], level, log["_id"]) == alert["id"]
    ]
    assert len(found) == 1, alert
    return found[0]


def test_one_alert_per_crossing_under_20_parallel_requests(
    observed: Observed, ostore: Store, oaccounts: Accounts, receiver: Receiver
) -> None:
    carol = oaccounts.new(creditsNew="1.02")
    sent = observed.value("burnmeter_alerts_sent_total")
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda _: chat(observed, carol.key, **BIG_ANSWER), range(20)))
    logs = wait_logs(ostore, carol.user_id, 20)
    observed.settled()
    spent = sum(log["creditsCost"] for log in logs)
    assert Decimal("1.02") - spent < THRESHOLD  # the pool did cross the threshold
    alerts = receiver.for_user(carol.user_id)
    assert len(alerts) == 1, alerts
    alert = alerts[0]
    assert (alert["kind"], alert["pool"], alert["threshold"]) == ("balance_below", "openhands", 1.0)
    assert alert["balance"] < 1.0
    crossing_log(logs, alert)
    assert observed.value("burnmeter_alerts_sent_total") == sent + 1
    assert "s3cret" not in observed.get("/metrics").text  # the URL's secret is not a label


def test_reaching_zero_alerts_once(
    observed: Observed, ostore: Store, oaccounts: Accounts, receiver: Receiver
) -> None:
    dave = oaccounts.new(creditsNew="0.004")  # below the threshold from the start
    chat(observed, dave.key, x_chunks=10, max_tokens=10)  # about $0.0001: still above 0
    # its hold is what is left (it covers the input's upper bound), its answer costs more
    chat(observed, dave.key, x_chunks=600, max_tokens=600)
    logs = wait_logs(ostore, dave.user_id, 2)
    observed.settled()
    alerts = receiver.for_user(dave.user_id)
    assert [a["threshold"] for a in alerts] == [0.0]
    assert alerts[0]["balance"] <= 0
    crossing_log(logs, alerts[0])


def test_alert_through_a_receiver_that_fails_twice(
    observed: Observed, ostore: Store, oaccounts: Accounts, receiver: Receiver
) -> None:
    erin = oaccounts.new(creditsNew="1.001")
    failed = observed.value("burnmeter_alerts_failed_total")
    sent = observed.value("burnmeter_alerts_sent_total")
    with receiver.lock:
        receiver.fail = 2
    chat(observed, erin.key, **BIG_ANSWER)
    wait_logs(ostore, erin.user_id, 1)
    observed.settled()
    attempts = [a for a in receiver.attempts if a["user"] == erin.user_id]
    assert len(attempts) == 3
    assert len({a["id"] for a in attempts}) == 1  # retries carry the same id
    assert receiver.for_user(erin.user_id) == attempts[-1:]
    assert observed.value("burnmeter_alerts_failed_total") == failed + 2
    assert observed.value("burnmeter_alerts_sent_total") == sent + 1
