"""Alert rules, crossings and their delivery (``burnmeter.alerts``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from decimal import Decimal as D
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pytest

from burnmeter.alerts import AlertSender
from burnmeter.alerts import Crossing
from burnmeter.alerts import Rule
from burnmeter.alerts import crossed
from burnmeter.alerts import crossing_id
from burnmeter.alerts import crossings
from burnmeter.alerts import post_json
from burnmeter.alerts import rules
from burnmeter.alerts import webhook_origin
from burnmeter.config import parse_config
from burnmeter.exceptions import AlertConfigError
from burnmeter.exceptions import ConfigError
from burnmeter.store.base import Settlement
from scripts.processes import free_port

URL = "https://hooks.example:8443/T0/B1/secret?x=1"
AT = datetime(2025, 5, 1, tzinfo=UTC)


def config(*alerts: dict[str, object]):
    return parse_config({"alerts": list(alerts)})


def rule(threshold: str = "1", pools: frozenset[str] = frozenset(), url: str = URL) -> Rule:
    return Rule("balance_below", D(threshold), pools, url)


def settled(cost: str, request_id: str = "req-1", pool: str = "openhands") -> Settlement:
    return Settlement(request_id, "alice", pool, D(cost), 0, 0, 0, None, {})


# -- config --------------------------------------------------------------------------------
def test_rules_read_the_webhook_from_the_environment() -> None:
    cfg = config({"kind": "balance_below", "threshold": 2.5, "webhook_env": "HOOK"})
    assert rules(cfg, {"HOOK": URL}) == (rule("2.5"),)


@pytest.mark.parametrize(
    "alert, error",
    [
        ({"kind": "balance_above", "threshold": 1, "webhook_env": "H"}, "alerts.0.kind"),
        ({"kind": "balance_below", "threshold": -1, "webhook_env": "H"}, "alerts.0.threshold"),
        ({"kind": "balance_below", "threshold": 1, "webhook_env": "1X"}, "alerts.0.webhook_env"),
        ({"kind": "balance_below", "threshold": 1}, "alerts.0.webhook_env"),
        (
            {"kind": "balance_below", "threshold": 1, "webhook_env": "H", "pools": ["gold"]},
            "alerts.0.pools: no pool named 'gold'",
        ),
        ({"kind": "balance_below", "threshold": 1, "webhook_env": "H", "url": "x"}, "unknown key"),
    ],
)
def test_config_refuses_bad_alerts(alert: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        config(alert)


@pytest.mark.parametrize(
    "environ, error",
    [
        ({}, r"\$HOOK is not set"),
        ({"HOOK": "  "}, r"\$HOOK is not set"),
        ({"HOOK": "ftp://example/x"}, r"\$HOOK is not an http"),
        ({"HOOK": "http:///path"}, r"\$HOOK is not an http"),
        ({"HOOK": "http://example:99999/"}, r"\$HOOK is not an http"),
    ],
)
def test_rules_refuse_an_unusable_webhook(environ: dict[str, str], error: str) -> None:
    cfg = config({"kind": "balance_below", "threshold": 1, "webhook_env": "HOOK"})
    with pytest.raises(AlertConfigError, match="alerts.0.webhook_env: " + error):
        rules(cfg, environ)


def test_webhook_origin_drops_path_query_and_credentials() -> None:
    assert webhook_origin(URL) == "https://hooks.example:8443"
    assert webhook_origin("http://user:pw@example/hook") == "http://example"


# -- crossings ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "level, before, after, expected",
    [
        ("1", "1.5", "0.5", True),
        ("1", "1", "0.99", True),  # at the threshold is not below it
        ("1", "1.5", "1", False),
        ("1", "0.9", "0.5", False),  # already below
        ("0", "0.1", "0", True),  # reaching 0
        ("0", "0.1", "-0.2", True),
        ("0", "0", "-1", False),
        ("1", "0.5", "1.5", False),  # a top-up
    ],
)
def test_crossed(level: str, before: str, after: str, expected: bool) -> None:
    assert crossed(D(level), D(before), D(after)) is expected


def test_a_settlement_crossing_the_threshold_raises_one_alert() -> None:
    found = crossings([rule("1")], settled("0.5"), after=D("0.75"), now=AT)
    assert found == [
        Crossing(
            id=crossing_id("alice", "openhands", D(1), "req-1"),
            kind="balance_below",
            user="alice",
            pool="openhands",
            balance=D("0.75"),
            threshold=D(1),
            at=AT,
            url=URL,
        )
    ]
    assert json.loads(found[0].payload()) == {
        "id": found[0].id,
        "kind": "balance_below",
        "user": "alice",
        "pool": "openhands",
        "balance": 0.75,
        "threshold": 1.0,
        "at": "2025-05-01T00:00:00+00:00",
    }


def test_a_settlement_crossing_both_levels_raises_two() -> None:
    found = crossings([rule("1")], settled("2"), after=D("-0.5"), now=AT)
    assert [c.threshold for c in found] == [D(1), D(0)]


def test_rules_for_other_pools_are_silent() -> None:
    assert crossings([rule("1", frozenset({"ohmygpt"}))], settled("0.5"), D("0.75")) == []


def test_one_alert_per_webhook_and_crossing() -> None:
    """Two rules naming the same webhook and level send it once; another webhook gets its own."""
    other = "http://127.0.0.1:9/hook"
    found = crossings([rule("1"), rule("1.0"), rule("1", url=other)], settled("0.5"), D("0.75"))
    assert sorted(c.url for c in found) == sorted([URL, other])
    assert found[0].id == found[1].id


def test_ids_are_stable_and_distinct() -> None:
    first = crossing_id("alice", "openhands", D("1.0"), "req-1")
    assert first == crossing_id("alice", "openhands", D("1.00"), "req-1")
    others = {
        crossing_id("bob", "openhands", D(1), "req-1"),
        crossing_id("alice", "ohmygpt", D(1), "req-1"),
        crossing_id("alice", "openhands", D(2), "req-1"),
        crossing_id("alice", "openhands", D(1), "req-2"),
    }
    assert first not in others and len(others) == 4


def test_a_descent_crosses_each_level_exactly_once() -> None:
    """Settlements lower the committed balance by their cost: one crossing per level."""
    balance = D("3.2")
    found = []
    for i in range(40):
        balance -= D("0.1")
        found += crossings([rule("1"), rule("2")], settled("0.1", f"r{i}"), balance)
    assert sorted(c.threshold for c in found) == [D(0), D(1), D(2)]


# -- delivery -------------------------------------------------------------------------------
class Receiver:
    """A ``post`` that fails the first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, url: str, body: bytes, timeout: float) -> None:
        with self.lock:
            self.calls.append((url, body))
            if len(self.calls) <= self.failures:
                raise OSError("HTTP Error 500")


class Outcomes:
    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {"sent": [], "failed": [], "dropped": []}
        self.finished = threading.Event()

    def sender(self, post: Receiver, **kwargs: object) -> AlertSender:
        return AlertSender(
            post=post,
            backoff=(0.001, 0.004),
            on_sent=self._note("sent"),
            on_failed=self._note("failed"),
            on_dropped=self._note("dropped"),
            **kwargs,  # type: ignore[arg-type]
        )

    def _note(self, what: str):
        def note(crossing: Crossing) -> None:
            self.seen[what].append(crossing.id)
            if what != "failed":
                self.finished.set()

        return note


def until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "state not reached"
        time.sleep(0.001)


def crossing(n: int = 1) -> Crossing:
    return crossings([rule("1")], settled("0.5", f"req-{n}"), D("0.75"), now=AT)[0]


def test_delivery_is_retried_with_the_same_body() -> None:
    post, outcomes = Receiver(failures=2), Outcomes()
    sender = outcomes.sender(post)
    sender.send(crossing())
    assert outcomes.finished.wait(10)
    sender.stop(5)
    assert outcomes.seen == {"sent": [crossing().id], "failed": [crossing().id] * 2, "dropped": []}
    assert len(post.calls) == 3 and len(set(post.calls)) == 1


def test_delivery_gives_up_after_its_attempts() -> None:
    post, outcomes = Receiver(failures=99), Outcomes()
    sender = outcomes.sender(post, attempts=3)
    sender.send(crossing())
    assert outcomes.finished.wait(10)
    sender.stop(5)
    assert outcomes.seen == {"sent": [], "failed": [crossing().id] * 3, "dropped": [crossing().id]}


def test_a_full_queue_drops_without_blocking() -> None:
    gate = threading.Event()

    def stuck(url: str, body: bytes, timeout: float) -> None:
        gate.wait(10)

    outcomes = Outcomes()
    sender = outcomes.sender(stuck, max_queued=1)  # type: ignore[arg-type]
    sender.send(crossing(1))  # taken by the thread, which then hangs in post
    until(lambda: sender.pending == 1 and not sender._due)
    sender.send(crossing(2))  # queued
    sender.send(crossing(3))  # no room
    assert outcomes.seen["dropped"] == [crossing(3).id]
    assert sender.pending == 2
    gate.set()
    sender.stop(5)
    assert crossing(1).id in outcomes.seen["sent"]


def test_stop_drops_what_is_waiting_for_a_retry() -> None:
    post, outcomes = Receiver(failures=1), Outcomes()
    sender = AlertSender(
        post=post, backoff=(60, 60), on_dropped=lambda c: outcomes.seen["dropped"].append(c.id)
    )
    sender.send(crossing())
    until(lambda: len(post.calls) == 1 and not sender._delivering)
    sender.stop(5)
    assert outcomes.seen["dropped"] == [crossing().id]
    assert sender.pending == 0


# -- the HTTP POST ----------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[tuple[str, list[bytes]]]:
    """A local receiver: /ok answers 204, /fail 500, /moved redirects to /ok."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            status = {"/ok": 204, "/fail": 500, "/moved": 307}[self.path]
            self.send_response(status)
            if status == 307:
                self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", bodies
    httpd.shutdown()
    httpd.server_close()


def test_post_json_delivers_on_2xx(server: tuple[str, list[bytes]]) -> None:
    base, bodies = server
    post_json(base + "/ok", b'{"id": "x"}', 5)
    assert bodies == [b'{"id": "x"}']


@pytest.mark.parametrize("path", ["/fail", "/moved"])
def test_post_json_fails_otherwise(server: tuple[str, list[bytes]], path: str) -> None:
    base, bodies = server
    with pytest.raises(OSError):
        post_json(base + path, b"{}", 5)
    assert len(bodies) == 1  # a redirect is not followed (it would lose the body)


def test_post_json_fails_when_nobody_listens() -> None:
    with pytest.raises(OSError):
        post_json(f"http://127.0.0.1:{free_port()}/x", b"{}", 5)
