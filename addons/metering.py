"""burnmeter: meter LLM API traffic through mitmproxy, billing each user's credit pools.

Run it (reverse mode, one ``--mode`` per upstream, is the production shape)::

    mitmdump -s addons/metering.py --mode reverse:https://api.openai.com@8004 \\
        [--set metering_config=burnmeter.toml] [--set metering_db=sqlite:///burnmeter.db]

Every request needs a client key (``Authorization: Bearer``, or ``x-api-key`` on
Anthropic paths); LLM requests are priced, held against the pool their host bills,
forwarded, and settled from the usage the upstream reports. Locally answered requests
(401/402/400/413/421/503) never reach the upstream.

Each request is read once (``addons/canonical.py``); what is decided and what is
forwarded come from that reading. The addon sets three mitmproxy options itself when it
loads (mitmproxy listens before scripts' ``running`` hook) and refuses a change to the first
two: ``connection_strategy=lazy`` (so no upstream connection is opened for a request answered
locally, and an unreachable upstream still lets the addon answer),
``keep_host_header=true`` (in reverse mode mitmproxy would otherwise replace the client's
Host header, which picks the pool, before any hook runs; the addon reads it and then sets
the upstream's Host itself) and ``body_size_limit`` (the config's ``max_request_bytes``:
request bodies are buffered before they are metered).

Charges are never lost or doubled: each settlement is appended to a local write-ahead
journal (``metering_journal``) before the response ends, and one writer thread applies
the journal to the store (idempotent by request id), replaying what is left after a
crash, a store outage or a shutdown. While the store is down, clients whose keys are
cached are served without a hold and their settlements wait in the journal; other keys,
and every new metered request once the journal is near ``metering_journal_max_kb``, get
503. ``rate_limit_rpm`` (config, global or per route) answers 429 with ``Retry-After``.

Once it serves, the addon logs one ``metering: ready: config …, store …, journal …,
listening on …`` line; a problem found at start-up (config, store, journal, a misspelt
``metering_*`` option) ends mitmdump with one line and exit status 1 instead.

Client keys never reach mitmproxy's own log lines either (``addons/redaction.py``): some
log raw client bytes of requests that never become flows.

Read streamed bodies in mitmweb with ``--set store_streamed_bodies=true`` (the "LLM
Stream" view); commands: ``metering.balance USER`` and ``metering.usage @all``.

Operating it: ``--set metering_metrics=HOST:PORT`` serves Prometheus metrics, ``/healthz``
and ``/readyz`` (``addons/metrics.py``, which times these hooks); ``GET /burnmeter/usage``
is answered locally with the client's own balances and spend (``addons/usage_endpoint.py``);
``[[alerts]]`` in the config post low-balance webhooks (``addons/alerts.py``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import sys
import weakref
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

from mitmproxy import command
from mitmproxy import contentviews
from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import flow
from mitmproxy import http
from mitmproxy.net.http import url
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ReverseMode

from addons import billing
from addons import errors
from addons import options
from addons.admission import Admission
from addons.admission import Ticket
from addons.alerts import Alerts
from addons.canonical import forward as forward_request
from addons.canonical import raw_style
from addons.canonical import read_request
from addons.errors import error_response
from addons.exceptions import Ambiguous
from addons.exceptions import Rejection
from addons.inspection import LLMStreamContentview
from addons.inspection import Outcome
from addons.inspection import annotate
from addons.inspection import describe
from addons.inspection import format_balances
from addons.inspection import usage_summary
from addons.keys import KeyCache
from addons.keys import drop_client_key
from addons.keys import set_upstream_key
from addons.metrics import Metrics
from addons.metrics import MetricsAddon
from addons.metrics import observed
from addons.ratelimit import RateLimiter
from addons.redaction import LogRedaction
from addons.streamtap import StreamTap
from addons.trailers import refuse_http1_trailers
from addons.usage_endpoint import UsageEndpoint
from burnmeter.exceptions import DocumentError
from burnmeter.exceptions import JournalError
from burnmeter.exceptions import JournalLocked
from burnmeter.exceptions import StoreError
from burnmeter.exceptions import StoreURLError
from burnmeter.journal import Journal
from burnmeter.journal import to_json
from burnmeter.records import UsageRecord
from burnmeter.store import open_store
from burnmeter.store import sqlite_path
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from burnmeter.writer import SettlementWriter

logger = logging.getLogger(__name__)

STORE_THREADS = 8
STOP_TIMEOUT = 10.0
"""Seconds ``done()`` lets the writer apply the journal; what is left waits for the next start."""
PURGE_INTERVAL = 3600.0
SHUTDOWN_STATUS = 503
"""Logged for requests still open when the proxy stops."""
DRAIN_TIMEOUT = 2.0
"""Seconds shutdown waits for the store calls under way (key look-ups, holds)."""
DURABLE_WAIT = 5.0
"""Seconds the end of a response waits for its settlement's fsync (durable mode); a slower
disk lets it go, logged, rather than hold every client."""
UNJOURNALED_KEPT = 10_000
"""Settlements the journal refused kept in memory for it (all are logged at ERROR)."""
REQUIRED_OPTIONS = {"connection_strategy": "lazy", "keep_host_header": True}
TLS_SCHEMES = ("https", "tls", "http3", "quic", "dtls")


def declared_size(request: http.Request) -> int:
    try:
        return int(request.headers.get("content-length", "0"))
    except ValueError:
        return 0


def spill(settlement: Settlement, why: str) -> None:
    """Log a settlement the journal refused, as one JSON line an operator can replay."""
    record = to_json(settlement)
    logger.error("metering: settlement not journaled (%s): %s", why, record)


def open_journal(settings: options.Settings) -> Journal:
    try:
        return Journal(settings.journal_path, settings.journal_max_bytes, fsync=settings.durable)
    except JournalLocked:
        raise exceptions.OptionsError(
            f"metering_journal: {settings.journal_path} is in use by another burnmeter process"
            " (give each process its own journal)"
        ) from None
    except OSError as e:
        raise exceptions.OptionsError(
            f"metering_journal: {settings.journal_path}: {e.strerror}"
        ) from None


def ready_line(settings: options.Settings, addresses: Sequence[str]) -> str:
    """What this process serves with (no password of a store URL)."""
    return (
        f"config {settings.config_source.describe()}"
        f", store {settings.db_url.partition('@')[2] or settings.db_url}"
        f", journal {settings.journal_path}"
        f", listening on {', '.join(addresses)}"
    )


def sweep_interval(age: timedelta) -> float:
    """How often the writer looks for abandoned holds: a minute, or half a shorter age."""
    return min(60.0, max(0.5, age.total_seconds() / 2))


def open_checked_store(settings: options.Settings) -> Store:
    try:
        store = open_store(settings.db_url, settings.config.pools)
        store.ensure_schema(settings.config.log_ttl_days)
    except (StoreURLError, StoreError, DocumentError) as e:
        raise exceptions.OptionsError(f"metering_db: {e}") from None
    return store


class Metering:
    def __init__(self, *, exit_on_startup_error: bool = False) -> None:
        """``exit_on_startup_error``: a problem found before the proxy runs (config, store,
        journal, an unknown ``metering_*`` option) ends the process with one line on stderr
        and status 1, instead of mitmproxy's traceback and a proxy serving unmetered; later
        option changes are refused as usual (``OptionsError``)."""
        self.exit_on_startup_error = exit_on_startup_error
        self.is_running = False
        self.settings: options.Settings | None = None
        self.store: Store | None = None
        self.writer: SettlementWriter | None = None
        self.journal: Journal | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.admission: Admission | None = None
        self.unjournaled = 0
        """Settlements the journal refused (logged at ERROR for an operator to replay)."""
        self.waiting: collections.deque[Settlement] = collections.deque(maxlen=UNJOURNALED_KEPT)
        """Settlements the journal refused, journaled as soon as it takes writes again."""
        self.tickets: weakref.WeakKeyDictionary[http.HTTPFlow, Ticket] = weakref.WeakKeyDictionary()
        self.metrics: Metrics | None = None
        """Set by ``MetricsAddon`` while ``metering_metrics`` serves them."""
        self.alerts: Alerts | None = None
        self.unsynced: weakref.WeakKeyDictionary[http.HTTPFlow, Future[None]] = (
            weakref.WeakKeyDictionary()
        )
        """Durable mode: settled flows whose journal record is not fsynced yet, until their
        ``response`` hook (a flow that ends in ``error`` has no end to hold back)."""
        self.admitted: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        """Flows forwarded and not yet settled: each has journal room kept for it (a request
        still sending its body has none, so stalled uploads cannot use up that room)."""

    def load(self, loader) -> None:
        options.declare(loader)
        refuse_http1_trailers()
        # In force before mitmproxy listens (it starts listening before scripts' `running`):
        # a request in between would be routed by the upstream's Host and connect eagerly.
        changes = {
            k: v
            for k, v in REQUIRED_OPTIONS.items()
            if k in ctx.options and getattr(ctx.options, k) != v
        }
        if changes:
            logger.debug("metering: setting %s", changes)
            ctx.options.update(**changes)

    def configure(self, updated: set[str]) -> None:
        for name in updated & REQUIRED_OPTIONS.keys():
            if getattr(ctx.options, name) != REQUIRED_OPTIONS[name]:
                raise exceptions.OptionsError(
                    f"{name}: metering needs {name}={REQUIRED_OPTIONS[name]}"
                )
        if not updated & options.NAMES:
            return
        try:
            if not self.is_running:
                if unknown := options.unknown_options(ctx.options.deferred):
                    raise exceptions.OptionsError("; ".join(unknown))
            self._configure()
        except exceptions.OptionsError as e:
            if self.is_running or not self.exit_on_startup_error:
                raise
            self._close()
            # mitmproxy reports its own bad options the same way; SystemExit passes through
            # its script loader, which would log a traceback and keep the proxy running
            raise SystemExit(f"{Path(sys.argv[0]).name}: {e}") from None

    def _configure(self) -> None:
        settings = options.read_settings(ctx.options)
        if settings == self.settings:
            return
        store = open_checked_store(settings)
        journal = None
        if self.journal is None or self.journal.path != settings.journal_path:
            try:
                journal = open_journal(settings)  # before closing the running one
            except exceptions.OptionsError:
                store.close()
                raise
        self._close()
        if journal is None:
            try:
                journal = open_journal(settings)
            except exceptions.OptionsError:
                store.close()
                raise
        self._start(settings, store, journal)
        self._limit_request_bodies(settings.config.max_request_bytes)

    @staticmethod
    def _limit_request_bodies(max_bytes: int) -> None:
        """Have mitmproxy refuse (413) a request body as soon as it passes ``max_bytes``,
        whatever its framing: it buffers the whole body before the ``request`` hook, also a
        chunked or HTTP/2 one with no content-length to refuse it by, and also after a
        local answer was set. Its 413 is its own page (text/html), not the API's shape."""
        limit = str(max_bytes)
        if "body_size_limit" in ctx.options and ctx.options.body_size_limit != limit:
            ctx.options.update(body_size_limit=limit)

    def running(self) -> None:
        self.is_running = True
        if "web_columns" in ctx.options and "comment" not in ctx.options.web_columns:
            ctx.options.update(web_columns=[*ctx.options.web_columns, "comment"])  # mitmweb
        if self.settings is None:
            return
        server = ctx.master.addons.get("proxyserver")
        addresses = [
            f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            for host, port, *_ in server.listen_addrs()
        ]
        if addresses:
            logger.info("metering: ready: %s", ready_line(self.settings, addresses))
        else:  # mitmproxy said why (a port in use, say) and runs on without a server
            logger.error("metering: not ready: the proxy listens on no address")

    def done(self) -> None:
        try:
            self._settle_in_flight()
        finally:
            self._close()  # the writer applies the journal and the holds close

    def _settle_in_flight(self) -> None:
        """Shutdown does not wait for open requests: settle each one now, so no hold
        outlives us and nothing goes out unmetered while the event loop winds down.

        A response that is all in is settled as if its ``response`` hook had run: the
        client gets all of it. Every other request is killed, so its client never sees a
        complete answer, and settled as cut off, charged for what already reached the
        client (as ``error`` would); one still waiting for its hold is settled at 0 once
        the hold call is done (which releases the hold, if it was made).

        One flow that cannot be settled (logged) does not stop the others."""
        if self.writer is None or self.admission is None:
            return
        self.admission.drain(DRAIN_TIMEOUT)
        for f, ticket in list(self.tickets.items()):
            self._take(f)
            try:
                self._settle_at_shutdown(f, ticket)
            except Exception:
                logger.exception("metering: cannot settle %s at shutdown", f.id)

    def _settle_at_shutdown(self, f: http.HTTPFlow, ticket: Ticket) -> None:
        response = f.response
        if ticket.admitted and response and billing.arrived_whole(ticket, response):
            self._settle_response(f, ticket, response)
            return
        if f.killable:
            f.kill()
        if ticket.quote is None:  # no hold asked for: nothing to settle
            return
        admitted = ticket.admitted
        self._settle(
            f,
            ticket,
            lambda: billing.error_usage(ticket, f.request, response) if admitted else None,
            SHUTDOWN_STATUS,
            "proxy shut down",
        )

    def _start(self, settings: options.Settings, store: Store, journal: Journal) -> None:
        config = settings.config
        ttl = config.log_ttl_days
        self.settings = settings
        self.store = store
        self.journal = journal
        self.alerts = (
            Alerts(settings.alert_rules, lambda: self.metrics) if settings.alert_rules else None
        )
        self.writer = SettlementWriter(
            # its own connection
            lambda: open_store(settings.db_url, config.pools, durable=settings.durable),
            journal,
            sweep_interval=sweep_interval(settings.sweep_age),
            sweep_age=settings.sweep_age,
            # MongoDB has a TTL index; SQLite's logs are purged by the writer
            log_ttl=timedelta(days=ttl) if ttl and sqlite_path(settings.db_url) else None,
            purge_interval=PURGE_INTERVAL,
            on_settled=self.alerts.settled if self.alerts else None,
        )
        self.writer.start()
        self.executor = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="metering-store")
        self.admission = Admission(
            config,
            store,
            KeyCache(settings.key_cache_ttl),
            self.writer,
            self.executor,
            RateLimiter(),
            in_flight=lambda: len(self.admitted),
        )
        legacy = options.legacy_journal(settings.db_url)
        if legacy != settings.journal_path and os.path.isfile(legacy) and os.path.getsize(legacy):
            logger.warning(
                "metering: %s holds settlements of an earlier version's default journal:"
                " replay it (burnmeter journal replay %s)",
                legacy,
                legacy,
            )

    def _close(self) -> None:
        if self.admission is not None:
            self.admission.close(DRAIN_TIMEOUT)  # holds left are swept, as after a crash
        if self.writer is not None:
            self._journal_waiting()
            self.writer.stop(STOP_TIMEOUT)
        if self.alerts is not None:
            self.alerts.stop()
        if self.executor is not None:
            # a store call stuck on a lock must not hold up shutdown
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()
        if self.store is not None:
            self.store.close()
        self.settings = self.store = self.writer = self.executor = self.admission = None
        self.journal = self.alerts = None

    @observed
    async def requestheaders(self, f: http.HTTPFlow) -> None:
        if f.error:
            # mitmproxy refused the request itself (two Content-Length values...): it is
            # never forwarded, but the dumper prints it in the error hook, before ours
            f.request.path = f.request.path.partition("#")[0]
            drop_client_key(f.request)
            return
        if f.response:
            return
        if self.admission is None:
            self._reject(f, None, Rejection(errors.UNAVAILABLE, "Metering is not configured"))
            return
        reverse = isinstance(f.client_conn.proxy_mode, ReverseMode)
        try:
            canonical = read_request(f.request, reverse=reverse)
        except Ambiguous as e:
            # mitmproxy prints the request line: an unread query or fragment may hold a key
            f.request.path = f.request.path.partition("?")[0].partition("#")[0]
            self._reject(f, None, Rejection(e.problem, str(e)), e.style)
            return
        try:
            ticket = await self.admission.authenticate(f, canonical)
        except Rejection as r:
            self._reject(f, None, r, canonical.style)
            return
        except Exception:
            # Fail closed: mitmproxy would log the error and forward the request unmetered.
            logger.exception("metering: authentication failed")
            self._reject(f, None, Rejection(errors.UNAVAILABLE, "Metering failed, retry later"))
            return
        self._forward(f, ticket)
        if ticket.api is None:
            annotate(f, describe(ticket, "passthrough"))
            return
        try:
            self.admission.check_size(declared_size(f.request))
        except Rejection as r:
            self._reject(f, ticket, r)
            return
        self.tickets[f] = ticket

    @observed
    async def request(self, f: http.HTTPFlow) -> None:
        if f.request.trailers and not f.response:  # addons/trailers.py: HTTP/1's too
            # never forwarded: not metered, and mitmproxy cannot send them over HTTP/1
            refusal = Rejection(errors.AMBIGUOUS, "Request trailers are not supported")
            self._reject(f, self.tickets.get(f), refusal)
            return
        ticket = self.tickets.get(f)
        if ticket is None or f.response or self.admission is None:
            return
        try:
            await self.admission.admit(f, ticket)
            self.admitted.add(f)
        except Rejection as r:
            self._reject(f, ticket, r)
        except Exception:
            # Fail closed: a request that admission could not price must not go out unmetered.
            logger.exception("metering: admission failed")
            self._reject(f, ticket, Rejection(errors.UNAVAILABLE, "Metering failed, retry later"))
        finally:
            ticket.client_key = ""  # stripped from headers, query and body checks: let it go

    @observed
    def responseheaders(self, f: http.HTTPFlow) -> None:
        if f.response is not None and f.response.status_code == 101 and f.killable:
            # a protocol switch nobody asked for (upgrades are refused): an unmetered channel
            f.kill()
            return
        ticket = self.tickets.get(f)
        if ticket is None or not ticket.admitted or f.response is None:
            return
        assert ticket.api is not None
        status = f.response.status_code
        is_sse = f.response.headers.get("content-type", "").startswith("text/event-stream")
        if is_sse or (ticket.stream and 200 <= status < 300):
            ticket.tap = StreamTap(
                ticket.api,
                f.response.headers.get("content-encoding"),
                on_end_event=functools.partial(self._settle_at_end_event, weakref.ref(f)),
            )
            f.response.stream = ticket.tap

    def _settle_at_end_event(self, ref: weakref.ref[http.HTTPFlow]) -> None:
        """The stream's end marker has been read: settle now, not at the end of the HTTP
        message (an upstream may hold the connection open, the proxy may die meanwhile);
        the ticket is taken, so the ``response`` or ``error`` hook that follows does nothing."""
        f = ref()
        if f is None or f.response is None:
            return
        ticket = self._take(f)
        if ticket is not None and ticket.admitted:
            self._settle_response(f, ticket, f.response)

    @observed
    def response(self, f: http.HTTPFlow) -> Coroutine[None, None, None] | None:
        """mitmproxy sends the response's end (a body, or a stream's end of message) after
        this hook, awaiting what it returns: in durable mode, the settlement's fsync."""
        ticket = self._take(f)
        if ticket is not None and ticket.admitted and f.response is not None:
            self._settle_response(f, ticket, f.response)
        if (synced := self.unsynced.pop(f, None)) is not None:
            return self._durable(f, synced)
        return None

    @staticmethod
    async def _durable(f: http.HTTPFlow, synced: Future[None]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(synced)), DURABLE_WAIT)
        except TimeoutError:
            logger.warning(
                "metering: %s: journal fsync slower than %ss: not waited for", f.id, DURABLE_WAIT
            )
        except JournalError as e:
            logger.error("metering: %s: settlement journaled, maybe not durable: %s", f.id, e)

    def _settle_response(self, f: http.HTTPFlow, ticket: Ticket, response: http.Response) -> None:
        status = response.status_code
        reason = None if 200 <= status < 300 else f"upstream answered {status}"
        if billing.interim(response):
            # mitmproxy would pass the 1xx on as the whole answer: the client would wait
            # for a final one forever, and the upstream's (with its usage) is never read
            status = billing.UPSTREAM_FAILED
            f.response = error_response(
                ticket.style, errors.UPSTREAM_UNREADABLE, f"Upstream sent {reason}, no answer"
            )
        self._settle(
            f, ticket, lambda: billing.response_usage(ticket, f.request, response), status, reason
        )

    @observed
    def error(self, f: http.HTTPFlow) -> None:
        ticket = self._take(f)
        if ticket is None or not ticket.admitted or f.error is None:
            return
        response = f.response
        status = billing.error_status(f)
        left = billing.client_left(f, status)
        self._settle(
            f,
            ticket,
            lambda: billing.error_usage(ticket, f.request, response, client_left=left),
            status,
            f.error.msg,
        )

    def _take(self, f: http.HTTPFlow) -> Ticket | None:
        """The flow's ticket, which it gives up: the flow is settled or answered locally."""
        self.admitted.discard(f)
        return self.tickets.pop(f, None)

    def _forward(self, f: http.HTTPFlow, ticket: Ticket) -> None:
        """Address the upstream as mitmproxy would have: its Host, its key.

        The route's upstream key goes only where the operator sends it: the reverse target,
        or in other modes (where the client picks the destination) the route's own host."""
        assert self.settings is not None
        reverse = isinstance(f.client_conn.proxy_mode, ReverseMode)
        forward_request(f.request, ticket.request, reverse=reverse)
        if reverse:
            f.request.host_header = url.hostport(f.request.scheme, f.request.host, f.request.port)
        route = ticket.route
        upstream_key = self.settings.upstream_keys.get(route)
        if not reverse and route.host is None:
            upstream_key = None  # a listen-port or the default route matches any destination
        set_upstream_key(f.request, ticket.style, upstream_key, ticket.client_key)

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Reverse mode over TLS: present the upstream's own name (SNI), not the client's.

        mitmproxy does this itself unless ``keep_host_header`` is set, which this addon
        needs (the client's Host picks the pool)."""
        mode = data.client.proxy_mode
        if isinstance(mode, ReverseMode) and mode.scheme in TLS_SCHEMES:
            data.server.sni = mode.address[0]

    def _reject(
        self,
        f: http.HTTPFlow,
        ticket: Ticket | None,
        rejection: Rejection,
        style: errors.Style | None = None,
    ) -> None:
        if style is None:
            style = ticket.style if ticket else raw_style(f.request.path)
        problem = rejection.problem
        f.response = error_response(style, problem, rejection.message, **rejection.extra)
        f.response.headers.update(rejection.headers)
        # mitmproxy prints the request line (Gemini ?key=) and headers
        drop_client_key(f.request, ticket.client_key if ticket else None)
        self._take(f)
        annotate(f, describe(ticket, "rejected", status=problem.status, reason=problem.code))

    def _settle(
        self,
        f: http.HTTPFlow,
        ticket: Ticket,
        usage_of: Callable[[], UsageRecord | None],
        status: int,
        reason: str | None,
    ) -> None:
        """Journal the charge of ``usage_of()``. A forwarded request always ends with a
        settlement: if reading its usage or pricing it fails (an answer no test foresaw),
        it is charged its hold."""
        try:
            usage = usage_of()
            settlement = billing.settlement(f, ticket, usage, status)
        except Exception:
            logger.exception("metering: cannot price %s: charging its hold", f.id)
            usage = billing.held_usage(ticket)
            settlement = billing.settlement(f, ticket, usage, status)
        synced = self._record(settlement)
        if synced is not None and not synced.done():
            self.unsynced[f] = synced
        outcome: Outcome = "charged" if usage else "failed"
        record = describe(
            ticket, outcome, status=status, reason=reason, usage=usage, settlement=settlement
        )
        if ticket.hold is None:
            record["holdless"] = True  # admitted while the store was down
        annotate(f, record)

    def _record(self, settlement: Settlement) -> Future[None] | None:
        """The one hand-off of a settlement towards the store: journal it, wake the writer.

        Admission keeps room in the journal for every request in flight, so a refusal
        here means a disk error or a record far above the reserve: the settlement is then
        logged at ERROR as one JSON line (no key) for an operator to replay, never dropped
        silently, and kept to be journaled once the journal takes writes again (admission
        refuses new requests meanwhile). Returns the journal's future of the record's
        durability (``Journal.append``), None for a refused one."""
        assert self.writer is not None
        try:
            if not self._journal_waiting():
                raise JournalError(self.writer.journal.failing or "journal refused a record")
            synced = self.writer.submit(settlement)
        except JournalError as e:
            self.unjournaled += 1
            spill(settlement, str(e))
            self.waiting.append(settlement)
            return None
        self._count(settlement)
        return synced

    def _journal_waiting(self) -> bool:
        """Journal the settlements it refused before, oldest first; False if it still refuses."""
        assert self.writer is not None
        while self.waiting:
            try:
                self.writer.submit(self.waiting[0])
            except JournalError:
                return False
            self._count(self.waiting.popleft())
        return True

    def _count(self, settlement: Settlement) -> None:
        if self.metrics is not None:
            self.metrics.settled(settlement)

    @command.command("metering.balance")
    def balance(self, user: str) -> str:
        """Credit balance of USER in each pool."""
        if self.store is None or self.settings is None:
            raise exceptions.CommandError("metering is not configured")
        try:
            if self.store.user(user) is None:
                raise exceptions.CommandError(f"no user {user!r}")
            pools = self.settings.config.pools
            return format_balances((name, self.store.balance(user, p)) for name, p in pools.items())
        except StoreError as e:
            raise exceptions.CommandError(f"store unavailable: {e}") from None

    @command.command("metering.usage")
    def usage(self, flows: Sequence[flow.Flow]) -> str:
        """Tokens and cost of the metered flows among FLOWS (e.g. @all)."""
        return usage_summary(flows)


contentviews.add(LLMStreamContentview)

metering = Metering(exit_on_startup_error=True)
addons = [LogRedaction(), UsageEndpoint(metering), metering, MetricsAddon(metering)]
