"""No charge lost or doubled through crashes, store outages and shutdowns; per-key rate limit.

Each test runs its own mitmdump (the harness's ``Proxy`` with extra options) on its own
SQLite file and journal, in front of the session's fake upstream. Requests are told apart
in the logs by their output tokens: request ``i`` asks the fake for ``i + 1`` chunks.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from burnmeter.config import Config
from burnmeter.config import load_config
from burnmeter.documents import utcnow
from burnmeter.store import open_store
from burnmeter.store.base import Store
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import Account
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

START = Decimal(100)
MESSAGES = [{"role": "user", "content": "Say something."}]


@dataclass
class JournaledProxy(Proxy):
    """The harness's proxy with its own journal (and extra ``--set`` options)."""

    journal_file: Path = Path()

    @property
    def journal_path(self) -> Path:
        return self.journal_file

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def journal_size(self) -> int:
        return self.journal_file.stat().st_size if self.journal_file.exists() else 0


@dataclass
class Site:
    """One test's files: config, database, journal; proxies start and stop on them."""

    upstream: Upstream
    workdir: Path
    config: Config
    store: Store
    accounts: Accounts
    proxies: list[JournaledProxy] = field(default_factory=list)

    def proxy(self, **options: object) -> JournaledProxy:
        proxy = JournaledProxy(
            self.upstream,
            self.workdir / "burnmeter.toml",
            self.workdir / "burnmeter.db",
            self.workdir,
            journal_file=self.workdir / "settlements.journal",
            options=options,
        )
        self.proxies.append(proxy)
        proxy.start()
        return proxy

    def spent(self, account: Account) -> Decimal:
        return START - self.store.balance(account.user_id, self.config.pools["openhands"])

    def open_holds(self) -> list[Any]:
        return self.store.open_holds(utcnow() + timedelta(days=1))


def make_site(upstream: Upstream, workdir: Path, toml: str = CONFIG_TOML) -> Site:
    (workdir / "burnmeter.toml").write_text(toml)
    (workdir / "burnmeter.toml").chmod(0o600)
    config = load_config(workdir / "burnmeter.toml")
    store = open_store(f"sqlite:///{workdir / 'burnmeter.db'}", config.pools)
    store.ensure_schema(0)
    return Site(upstream, workdir, config, store, Accounts(store))


@contextmanager
def running_site(upstream: Upstream, workdir: Path, toml: str = CONFIG_TOML) -> Iterator[Site]:
    """A site whose proxies are killed, and store closed, at the end."""
    made = make_site(upstream, workdir, toml)
    try:
        yield made
    finally:
        for proxy in made.proxies:
            if proxy.proc is not None and proxy.proc.poll() is None:
                proxy.kill()
        made.store.close()


@pytest.fixture
def site(upstream: Upstream, tmp_path: Path) -> Iterator[Site]:
    with running_site(upstream, tmp_path) as made:
        yield made


# -- clients -------------------------------------------------------------------------------
def chat(
    proxy: Proxy, key: str, chunks: int, *, stream: bool, timeout: float = 10, **knobs: int
) -> tuple[int, bool, Any]:
    """(status, complete, JSON body or None): complete = the whole answer arrived."""
    body = {"model": "fake-gpt", "messages": MESSAGES, "x_chunks": chunks, **knobs}
    if stream:
        body["stream"] = True
    headers = {"Host": OPENHANDS_HOST, "Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=timeout) as client:
        with client.stream(
            "POST", proxy.base_url + "/v1/chat/completions", json=body, headers=headers
        ) as response:
            data = response.read()
    if response.status_code != 200:
        return response.status_code, True, json.loads(data)
    if stream:
        return 200, data.rstrip().endswith(b"data: [DONE]"), None
    return 200, True, json.loads(data)


def stream_until_cut(proxy: Proxy, key: str, started: threading.Event) -> None:
    """A stream far longer than the test: sets ``started`` at its first bytes."""
    body = {
        "model": "fake-gpt",
        "messages": MESSAGES,
        "stream": True,
        "x_chunks": 5000,
        "x_delay_ms": 2,
    }
    headers = {"Host": OPENHANDS_HOST, "Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(timeout=10) as client:
            with client.stream(
                "POST", proxy.base_url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                for _ in response.iter_raw():
                    started.set()
    except httpx.HTTPError:
        pass


@dataclass
class Load:
    """Requests ``i = 0, 1, ...`` (i + 1 output tokens each) from ``workers`` threads."""

    proxy: Proxy
    key: str
    workers: int = 12
    complete: list[int] = field(default_factory=list)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _one(self, i: int) -> None:
        try:
            status, complete, _ = chat(
                self.proxy, self.key, i + 1, stream=i % 2 == 0, x_delay_ms=3, x_ttft_ms=20
            )
        except httpx.HTTPError:
            return
        if status == 200 and complete:
            with self._lock:
                self.complete.append(i)

    def _worker(self, first: int) -> None:
        i = first
        while not self._stop.is_set():
            with self._lock:
                self.sent = max(self.sent, i + 1)
            self._one(i)
            i += self.workers

    def run(self, seconds: float, then: Callable[[], None]) -> None:
        """Load for ``seconds``, call ``then`` while requests are in flight, stop."""
        with ThreadPoolExecutor(self.workers) as pool:
            for w in range(self.workers):
                pool.submit(self._worker, w)
            try:
                time.sleep(seconds)
                then()
            finally:
                self._stop.set()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def check_books(site: Site, account: Account, complete: list[int]) -> list[dict[str, Any]]:
    """Every complete request logged once; Σ logged cost = balance change; no hold left."""
    logs = site.store.logs(10_000, account.user_id)
    # requests cut off are logged too (status 503 or 499), with estimated output tokens
    by_output = Counter(log["outputTokens"] for log in logs if log["statusCode"] == 200)
    missing = [i for i in complete if by_output[i + 1] == 0]
    doubled = [i for i in complete if by_output[i + 1] > 1]
    assert not missing and not doubled, f"missing {missing}, doubled {doubled}"
    assert site.open_holds() == []
    spent = site.spent(account)
    assert sum(log["creditsCost"] for log in logs) == spent
    user = site.store.user(account.user_id)
    assert user is not None and user["creditsNewUsed"] == spent
    return logs


@pytest.fixture
def lock() -> Iterator[Callable[[Path], sqlite3.Connection]]:
    """Hold the SQLite write lock from the test process, as another writer would."""
    held: list[sqlite3.Connection] = []

    def take(db: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(db, isolation_level=None, timeout=5)
        conn.execute("BEGIN EXCLUSIVE")
        held.append(conn)
        return conn

    yield take
    for conn in held:
        conn.close()


# -- crashes and shutdowns -------------------------------------------------------------------
def test_sigkill_mid_load_then_restart_replays_once(
    site: Site, lock: Callable[[Path], sqlite3.Connection]
) -> None:
    alice = site.accounts.new(creditsNew=START)
    proxy = site.proxy(metering_sweep_seconds=2)
    load = Load(proxy, alice.key)

    def kill_with_a_backlog() -> None:
        conn = lock(proxy.db_path)  # the writer falls behind: the journal fills
        # hold-less requests finish once their hold times out (STORE_TIMEOUT): wait for
        # their settlements in the journal, however slow the machine is
        wait_until(lambda: proxy.journal_size() > 0, 20, "settlements waiting in the journal")
        proxy.kill()
        conn.execute("ROLLBACK")

    load.run(1.0, kill_with_a_backlog)
    assert load.complete and len(load.complete) < load.sent, "killed mid-load"

    restarted = site.proxy(metering_sweep_seconds=2)  # same database and journal
    wait_until(lambda: restarted.journal_size() == 0, 10, "the replay")
    wait_until(lambda: site.open_holds() == [], 10, "the hold sweep")
    logs = check_books(site, alice, load.complete)
    assert len(logs) <= load.sent
    assert "replaying" in restarted.output()
    assert restarted.stop() == 0


def test_sigterm_under_load_exits_quickly_with_everything_applied(site: Site) -> None:
    alice = site.accounts.new(creditsNew=START)
    proxy = site.proxy()
    load = Load(proxy, alice.key)
    took: list[float] = []
    streaming = threading.Event()
    long_stream = threading.Thread(target=stream_until_cut, args=(proxy, alice.key, streaming))
    long_stream.start()

    def terminate() -> None:
        assert proxy.proc is not None
        assert streaming.wait(10), "a stream is open when the signal comes"
        started = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.proc.wait(15)
        took.append(time.monotonic() - started)

    load.run(1.0, terminate)
    long_stream.join(10)
    assert took and took[0] < 15
    assert proxy.journal_size() == 0, "checkpointed at the end"
    # requests still open at the signal are settled as cut off: no hold outlives the proxy,
    # and what already reached the client is charged
    logs = check_books(site, alice, load.complete)
    cut = [log for log in logs if log["statusCode"] == 503 and log["stream"]]
    assert any(log["usageSource"] == "estimated" and log["creditsCost"] > 0 for log in cut)


# -- store outage --------------------------------------------------------------------------
def test_store_outage_serves_cached_keys_and_applies_everything_once(
    site: Site, lock: Callable[[Path], sqlite3.Connection]
) -> None:
    alice = site.accounts.new(creditsNew=START)
    carol = site.accounts.new(creditsNew=START)  # valid, but not in the key cache
    proxy = site.proxy()
    assert chat(proxy, alice.key, 1, stream=False)[0] == 200
    wait_until(lambda: len(site.store.logs(10, alice.user_id)) == 1, 5, "the first log")

    conn = lock(proxy.db_path)
    served = 1
    deadline = time.monotonic() + 8
    i = 1
    while time.monotonic() < deadline:
        started = time.monotonic()
        status, complete, _ = chat(proxy, alice.key, i + 1, stream=i % 2 == 0)
        assert (status, complete) == (200, True)
        assert time.monotonic() - started < 2.5, "a locked store must not hang clients"
        served += 1
        i += 1
        status, _, error = chat(proxy, carol.key, 1, stream=False)
        assert status == 503 and error["error"]["code"] == "metering_unavailable"
        status, _, error = chat(proxy, site.accounts.unknown_key(), 1, stream=False)
        assert status in (401, 503) and "error" in error
    assert proxy.journal_size() > 0, "settlements wait in the journal"
    assert len(site.store.logs(1000, alice.user_id)) == 1
    conn.execute("ROLLBACK")

    wait_until(lambda: len(site.store.logs(1000, alice.user_id)) == served, 15, "the backlog")
    wait_until(lambda: site.open_holds() == [], 10, "late holds released")
    check_books(site, alice, list(range(served)))
    assert chat(proxy, carol.key, 1, stream=False)[0] == 200, "the store is back"
    assert proxy.stop() == 0


def test_full_journal_refuses_new_requests_with_503(
    site: Site, lock: Callable[[Path], sqlite3.Connection]
) -> None:
    alice = site.accounts.new(creditsNew=START)
    proxy = site.proxy(metering_journal_max_kb=16)
    assert chat(proxy, alice.key, 1, stream=False)[0] == 200
    conn = lock(proxy.db_path)
    served = 1
    for i in range(1, 40):
        status, _, error = chat(proxy, alice.key, i + 1, stream=False)
        if status != 200:
            break
        served += 1
    assert status == 503 and error["error"]["code"] == "metering_unavailable"
    assert 3 <= served < 40
    assert proxy.journal_size() <= 16 * 1024
    conn.execute("ROLLBACK")
    wait_until(lambda: proxy.journal_size() == 0, 15, "the backlog")
    wait_until(lambda: site.open_holds() == [], 10, "late holds released")
    check_books(site, alice, list(range(served)))
    assert chat(proxy, alice.key, 1, stream=False)[0] == 200
    assert proxy.stop() == 0


# -- rate limit ----------------------------------------------------------------------------
def test_rate_limit_answers_429_with_retry_after_in_the_api_shape(
    upstream: Upstream, tmp_path: Path
) -> None:
    site = make_site(upstream, tmp_path, "rate_limit_rpm = 3\n" + CONFIG_TOML)
    try:
        alice = site.accounts.new(creditsNew=START)
        proxy = site.proxy()
        for i in range(3):
            assert chat(proxy, alice.key, i + 1, stream=i == 1)[0] == 200
        before = upstream.stats()["total"]
        headers = {"Host": OPENHANDS_HOST, "Authorization": f"Bearer {alice.key}"}
        body = {"model": "fake-gpt", "messages": MESSAGES}
        response = httpx.post(
            proxy.base_url + "/v1/chat/completions", json=body, headers=headers, timeout=10
        )
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 19
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        anthropic_headers = {"Host": OPENHANDS_HOST, "x-api-key": alice.key}
        anthropic_body = {"model": "fake-claude", "max_tokens": 10, "messages": MESSAGES}
        response = httpx.post(
            proxy.base_url + "/v1/messages",
            json=anthropic_body,
            headers=anthropic_headers,
            timeout=10,
        )
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "20"  # 3/min: one back every 20 s
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert upstream.stats()["total"] == before, "the upstream never saw them"
        bob = site.accounts.new(creditsNew=START)
        assert chat(proxy, bob.key, 1, stream=False)[0] == 200, "the limit is per key"
        assert proxy.stop() == 0
    finally:
        for proxy in site.proxies:
            if proxy.proc is not None and proxy.proc.poll() is None:
                proxy.kill()
        site.store.close()
