"""Prometheus metrics, ``/healthz`` and ``/readyz``: ``--set metering_metrics=HOST:PORT``.

The port is served by a thread of its own (``http.server``), never by the event loop.
Counters are fed by the metering hooks (``observed`` times each hook; ``settled`` counts
each journaled settlement, so Σ ``burnmeter_cost_usd_total`` is Σ ``creditsCost`` of the
logs this process writes); gauges are read when Prometheus scrapes; pool balances are
summed from the store every ``BALANCE_INTERVAL`` seconds by another thread.

Labels stay bounded: pools come from the config, APIs and outcomes are fixed sets, HTTP
codes are at most a few hundred, and models past ``MAX_MODELS`` different names share the
label ``other``, as does a name over ``MAX_MODEL_LABEL`` characters (a client can name any
model, and with ``unknown_model = "default"`` it is priced and logged). A ``user`` label is only added with
``metering_metrics_users=true``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING
from typing import Any

from mitmproxy import exceptions
from mitmproxy import http
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import exposition
from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from addons import billing
from addons import options
from addons.phases import Admitted
from burnmeter.exceptions import StoreError
from burnmeter.reports import reports_for
from burnmeter.store.base import Settlement

if TYPE_CHECKING:
    from addons.metering import Metering

logger = logging.getLogger(__name__)

BALANCE_INTERVAL = 30.0
READY_CACHE = 1.0
"""Seconds one readiness answer is reused (a scrape or probe storm costs one store probe)."""
PROBE_TIMEOUT = 1.0
"""Seconds the store has to show it could take a hold."""
READY_MAX_BACKLOG = 1000
"""Settlements waiting in the journal past which the process is not ready."""
MAX_MODELS = 200
MAX_MODEL_LABEL = 128
"""Characters of a model label: a longer name (a client's, priced by default) is ``other``."""
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
TOKEN_KINDS = {
    "input": "inputTokens",
    "output": "outputTokens",
    "cache_read": "cacheHitTokens",
    "cache_write": "cacheWriteTokens",
    "reasoning": "reasoningTokens",
}
"""Label of ``burnmeter_tokens_total`` → request log field."""
END_HOOKS = frozenset({"response", "error"})


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); ``ValueError`` otherwise."""
    host, colon, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reasons: tuple[str, ...]

    def body(self) -> bytes:
        return json.dumps({"ready": self.ready, "reasons": list(self.reasons)}).encode()


class Metrics:
    """One proxy process's registry, and what feeds it. Counting runs on the event loop:
    plain dict updates (``Tally``) and a few ``prometheus_client`` histogram observations
    per request, nothing that waits."""

    def __init__(self, metering: Metering, *, users: bool = False) -> None:
        self.metering = metering
        self.users = users
        self.registry = CollectorRegistry(auto_describe=True)
        user = ("user",) if users else ()
        self.requests = Tally(
            "burnmeter_requests",
            "Requests by pool, API, outcome and HTTP status.",
            ("pool", "api", "outcome", "code", *user),
        )
        self.cost = Tally(
            "burnmeter_cost_usd", "USD charged, from settlements.", ("pool", "model", *user)
        )
        self.tokens = Tally(
            "burnmeter_tokens",
            "Tokens charged, from settlements, by kind.",
            ("pool", "model", "kind", *user),
        )
        self.estimated = Tally(
            "burnmeter_estimated",
            "Settlements charged from an estimate (the upstream reported no usage).",
            ("pool", *user),
        )
        self.overhead = Histogram(
            "burnmeter_overhead_seconds",
            "Time the addon's hooks took for one request, all together.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.hold = Histogram(
            "burnmeter_hold_seconds",
            "Time admission took to price and hold a forwarded request (its request hook).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "burnmeter_ttft_seconds",
            "Time to the upstream's first response byte of streamed requests.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        alert_help = {
            "sent": "Low-balance alerts delivered.",
            "failed": "Low-balance alert deliveries that failed (each attempt).",
            "dropped": "Low-balance alerts given up (attempts exhausted, queue full, shutdown).",
        }
        self.alerts = {
            what: Counter(f"burnmeter_alerts_{what}", text, ("webhook",), registry=self.registry)
            for what, text in alert_help.items()
        }
        self.balances: dict[str, Decimal] = {}
        self._models: set[str] = set()
        self._spent: weakref.WeakKeyDictionary[http.HTTPFlow, float] = weakref.WeakKeyDictionary()
        self.registry.register(ScrapeCollector(self))

    # -- fed by the hooks (event loop) -----------------------------------------------------
    def _model(self, name: object) -> str:
        label = name if isinstance(name, str) else ""
        if label in self._models:
            return label
        if len(self._models) >= MAX_MODELS or len(label) > MAX_MODEL_LABEL:
            return "other"
        self._models.add(label)
        return label

    def hook_done(self, hook: str, f: http.HTTPFlow, elapsed: float) -> None:
        """After one metering hook: add up its time; after the last, count the request."""
        if hook == "requestheaders":
            self._spent[f] = elapsed
            return
        spent = self._spent.get(f)
        if spent is None:  # not seen from the start (metrics turned on meanwhile), or counted
            return
        if hook == "request":
            if isinstance(self.metering.phases.get(f), Admitted):
                self.hold.observe(elapsed)
        if hook not in END_HOOKS:
            self._spent[f] = spent + elapsed
            return
        del self._spent[f]
        self.overhead.observe(spent + elapsed)
        self.count(f)

    def count(self, f: http.HTTPFlow) -> None:
        record = f.metadata.get("metering")
        if not isinstance(record, dict):
            return
        code = record.get("status")
        if code is None:  # passed through: the upstream's answer
            code = f.response.status_code if f.response and not f.error else None
            if code is None:
                code = billing.error_status(f) if f.error else 0
        labels: tuple[str, ...] = (
            record.get("pool") or "",
            record.get("api") or "",
            record["outcome"],
            str(code),
        )
        if self.users:
            labels += (record.get("user") or "",)
        self.requests.add(labels)

    def settled(self, settlement: Settlement) -> None:
        """A settlement journaled: its cost, tokens, estimate and time to first byte."""
        log = settlement.log
        pool = settlement.pool
        user = (settlement.user_id,) if self.users else ()
        model = self._model(log.get("model"))
        if settlement.cost:
            self.cost.add((pool, model, *user), settlement.cost)
        for kind, field in TOKEN_KINDS.items():
            if count := log.get(field):
                self.tokens.add((pool, model, kind, *user), count)
        if log.get("usageSource") == "estimated":
            self.estimated.add((pool, *user))
        if (ttft := log.get("ttftMs")) is not None:
            self.ttft.observe(ttft / 1000)

    # -- the balance thread -----------------------------------------------------------------
    def refresh_balances(self) -> None:
        """Σ balance of every pool over the users, from the store (off the event loop)."""
        metering = self.metering
        store, settings = metering.store, metering.settings
        if store is None or settings is None:
            return
        pools = settings.config.pools
        fields = [name for pool in pools.values() for name in pool.balance]
        _, sums = reports_for(store).backend.population(fields)
        self.balances = {
            name: sum((sums.get(f, Decimal(0)) for f in pool.balance), Decimal(0))
            for name, pool in pools.items()
        }


class Tally:
    """A labelled counter in a plain dict, exact (Decimal USD stays Decimal until scraped).

    Only the event loop adds to it, so it needs no lock; a scrape reads a copy
    (``dict.copy`` runs under the GIL, whole). Half the cost of a ``prometheus_client``
    counter child per update, which matters on the request path."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.values: dict[tuple[str, ...], int | Decimal] = {}

    def add(self, labels: tuple[str, ...], amount: int | Decimal = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in self.values.copy().items():
            family.add_metric(labels, float(value))
        return family


class ScrapeCollector(Collector):
    """What is read when Prometheus scrapes: the journal, the store, requests in flight."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for tally in (self.metrics.requests, self.metrics.cost, self.metrics.tokens):
            yield tally.family()
        yield self.metrics.estimated.family()
        metering = self.metrics.metering
        journal, outage = metering.journal, metering.outage
        phases = _snapshot(metering.phases)
        yield GaugeMetricFamily(
            "burnmeter_journal_backlog",
            "Settlements journaled and not yet applied to the store.",
            journal.backlog if journal else 0,
        )
        yield GaugeMetricFamily(
            "burnmeter_journal_bytes", "Size of the journal file.", journal.size if journal else 0
        )
        store_up = outage is not None and not outage.store_down
        yield GaugeMetricFamily(
            "burnmeter_store_up", "1 while the store takes holds and settlements.", int(store_up)
        )
        yield GaugeMetricFamily(
            "burnmeter_holds_open",
            "Requests in flight holding credit in the store.",
            sum(1 for p in phases if isinstance(p, Admitted) and p.hold is not None),
        )
        yield GaugeMetricFamily(
            "burnmeter_in_flight",
            "Metered requests between admission and settlement.",
            len(phases),
        )
        yield CounterMetricFamily(
            "burnmeter_settlements_set_aside",
            "Settlements the store can never apply, moved to the journal's .rejected file.",
            journal.set_aside_count if journal else 0,
        )
        yield CounterMetricFamily(
            "burnmeter_settlements_unjournaled",
            "Settlements the journal refused, logged at ERROR for an operator to replay.",
            metering.unjournaled,
        )
        alerts = metering.alerts
        yield GaugeMetricFamily(
            "burnmeter_alerts_pending",
            "Low-balance alerts waiting for delivery (or for a retry).",
            alerts.sender.pending if alerts else 0,
        )
        balance = GaugeMetricFamily(
            "burnmeter_pool_balance_usd",
            f"Σ balance of each pool over the users (refreshed every {BALANCE_INTERVAL:.0f}s).",
            labels=["pool"],
        )
        for pool, amount in self.metrics.balances.items():
            balance.add_metric([pool], float(amount))
        yield balance


def _snapshot[K, V](mapping: weakref.WeakKeyDictionary[K, V]) -> list[V]:
    """The values, read from another thread than the one changing the mapping: a copy of
    the underlying dict's values is one C call under the GIL (iterating the mapping itself
    would not be, and would commit its pending removals from this thread)."""
    return list(mapping.data.values())  # type: ignore[attr-defined]


def observed[**P, R](hook: Callable[P, R]) -> Callable[P, R]:
    """Time a ``Metering`` hook (``hook(self, flow)``) for its ``metrics``, if any."""
    name = hook.__name__
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def run_async(*args: Any, **kwargs: Any) -> Any:
            metrics = args[0].metrics  # type: ignore[attr-defined]
            if metrics is None:
                return await hook(*args, **kwargs)  # type: ignore[misc]
            started = time.perf_counter()
            try:
                return await hook(*args, **kwargs)  # type: ignore[misc]
            finally:
                metrics.hook_done(name, args[1], time.perf_counter() - started)

        return run_async  # type: ignore[return-value]

    @functools.wraps(hook)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        metrics = args[0].metrics  # type: ignore[attr-defined]
        if metrics is None:
            return hook(*args, **kwargs)
        started = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            metrics.hook_done(name, args[1], time.perf_counter() - started)

    return run


class ReadinessCheck:
    """``/readyz``: config loaded, the store could take a hold now, the journal takes
    records, the backlog is short. The store probe runs on a thread of its own and is
    given ``PROBE_TIMEOUT``; answers are reused for ``READY_CACHE`` seconds."""

    def __init__(self, metering: Metering) -> None:
        self.metering = metering
        self._lock = threading.Lock()
        self._prober = ThreadPoolExecutor(1, thread_name_prefix="burnmeter-probe")
        self._probe: Future[None] | None = None
        self._answer: tuple[float, Readiness] | None = None

    def check(self) -> Readiness:
        with self._lock:
            now = time.monotonic()
            if self._answer is not None and now - self._answer[0] < READY_CACHE:
                return self._answer[1]
            answer = self._check()
            self._answer = (time.monotonic(), answer)
            return answer

    def _check(self) -> Readiness:
        metering = self.metering
        store, journal, writer = metering.store, metering.journal, metering.writer
        outage = metering.outage
        if metering.settings is None or store is None or journal is None or writer is None:
            return Readiness(False, ("metering is not configured",))
        reasons = []
        if (problem := self._probe_store(store)) is not None:
            reasons.append(f"store: {problem}")
        if not writer.healthy:
            reasons.append("store: settlements are not getting through")
        if not os.access(journal.path, os.W_OK):
            reasons.append(f"journal: {journal.path} is not writable")
        elif outage is not None and not outage.journal_has_room():
            reasons.append("journal: full")
        if journal.backlog > READY_MAX_BACKLOG:
            reasons.append(f"journal: {journal.backlog} settlements waiting")
        return Readiness(not reasons, tuple(reasons))

    def _probe_store(self, store: Any) -> str | None:
        probe = self._probe
        if probe is None or probe.done():
            probe = self._probe = self._prober.submit(store.probe_write, PROBE_TIMEOUT)
        try:
            probe.result(PROBE_TIMEOUT)
        except TimeoutError:
            return f"no answer within {PROBE_TIMEOUT:.0f}s"
        except StoreError as e:
            return str(e)
        return None

    def close(self) -> None:
        self._prober.shutdown(wait=False, cancel_futures=True)


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a thread of its own."""

    def __init__(self, address: tuple[str, int], metrics: Metrics, readiness: ReadinessCheck):
        self.metrics = metrics
        self.readiness = readiness
        self.httpd = ThreadingHTTPServer(address, self._handler())
        self.httpd.daemon_threads = True
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self.httpd.serve_forever, name="burnmeter-metrics"),
            threading.Thread(target=self._balances, name="burnmeter-balances"),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def _balances(self) -> None:
        while True:
            try:
                self.metrics.refresh_balances()
            except Exception as e:  # the store is down: keep the last figures
                logger.debug("metrics: pool balances not refreshed: %s", e)
            if self._stop.wait(BALANCE_INTERVAL):
                return

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.readiness.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.partition("?")[0]
                if path == "/metrics":
                    body = exposition.generate_latest(server.metrics.registry)
                    self._send(200, body, exposition.CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._send(200, b'{"status":"ok"}', "application/json")
                elif path == "/readyz":
                    answer = server.readiness.check()
                    self._send(200 if answer.ready else 503, answer.body(), "application/json")
                else:
                    self._send(404, b'{"error":"not found"}', "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes every few seconds would drown the proxy's log

        return Handler


class MetricsAddon:
    """The options; starts and stops the server for the metering addon it serves."""

    def __init__(self, metering: Metering) -> None:
        self.metering = metering
        self.server: MetricsServer | None = None
        self._address: tuple[str, int] | None = None
        self._users = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "metering_metrics",
            str | None,
            None,
            "Serve Prometheus /metrics, /healthz and /readyz on HOST:PORT (e.g. 127.0.0.1:9464).",
        )
        loader.add_option(
            "metering_metrics_users",
            bool,
            False,
            "Add a user label to the request, cost and token metrics (one series per user).",
        )

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        if not updated & options.METRICS_NAMES:
            return
        spec = ctx.options.metering_metrics
        try:
            address = parse_address(spec) if spec else None
        except ValueError as e:
            raise exceptions.OptionsError(f"metering_metrics: {e}") from None
        users = ctx.options.metering_metrics_users
        if (address, users) == (self._address, self._users) and (self.server or not address):
            return
        self._close()
        if address is None:
            return
        metrics = Metrics(self.metering, users=users)
        try:
            self.server = MetricsServer(address, metrics, ReadinessCheck(self.metering))
        except OSError as e:
            raise exceptions.OptionsError(f"metering_metrics: {spec}: {e.strerror}") from None
        self.metering.metrics = metrics
        self._address, self._users = address, users
        logger.info("metering: metrics on http://%s:%d/metrics", address[0], self.server.port)

    def done(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.server = None
        self.metering.metrics = None
        self._address = None
