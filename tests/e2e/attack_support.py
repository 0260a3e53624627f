"""The attack suite's lab: a real mitmdump in front of a realistic fake upstream, a raw HTTP/1.1
client that sends any bytes, and the invariants checked after every example.

The fake upstream runs with ``--realistic``: it reads a request as lenient real servers do
(fragment dropped, percent-decoding, dot segments resolved, model names without case or
spaces, output limits honoured, Gemini field masks) and records every request exactly as it
arrived (``/__received``), with what it served and what an honest answer generated. The
invariants compare that record with the store, the journal and the proxy's output:

I1  the upstream never serves a generation request without a hold: every request it served
    on a metered API has a request log of the example's users, and a request the proxy
    refused never reached it;
I2  every forwarded request is settled exactly once: no hold is left open, and every
    forwarded request on a path that is not free has its log;
I3  Σ logged ``creditsCost`` = the balance change, per user and pool (and no cost below 0);
I4  no raw client key in anything forwarded (target, headers, body the upstream received)
    or written (store file, journal, proxy output);
I5  the proxy keeps serving: every request gets an answer, and a plain valid request after
    the example succeeds (its log is also the barrier: the journal is applied in order, so
    once it is in the store every settlement made before it is too);
I6  generation is never cheaper than it was: what an honest upstream generated, priced as
    the most expensive model the request named (as the upstream reads names) at the least
    route multiplier the config allows it (a model with a pool of its own: its
    ``route_multiplier``, else the dearest route billing that pool; any other: the cheapest
    route to the pool that paid), is at most what was charged.

Examples are isolated by user: each makes fresh accounts, and the upstream's records are
read from a sequence number taken before the example.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote
from urllib.parse import unquote_to_bytes

import httpx

from burnmeter import pricing
from burnmeter.config import Config
from burnmeter.config import Route
from burnmeter.config import load_config
from burnmeter.documents import hash_key
from burnmeter.documents import new_key
from burnmeter.records import UsageRecord
from burnmeter.store import open_store
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from scripts.fake_upstream import resolve_target
from scripts.processes import stop_process
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import ROOT
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream

ANSWER_TIMEOUT = 5.0
"""Seconds a client waits for the proxy's answer (a request left hanging fails I5)."""
BARRIER_TIMEOUT = 10.0
"""Seconds for the liveness request's log to reach the store."""
SETTLE_TIMEOUT = 3.0
"""Seconds, after the barrier, for the example's own holds to close and logs to appear."""
POLL = 0.02
BALANCE = Decimal("100")

ATTACK_CONFIG = (
    CONFIG_TOML.replace('unknown_model = "reject"', 'unknown_model = "default"').replace(
        "log_ttl_days = 0\n",
        "log_ttl_days = 0\n\n[default_price]\ninput = 0.1\noutput = 0.4\n",
    )
    + """
[models."fake-flash"]
input = 0.3
output = 2.5

[models."fake-pro"]
input = 2.5
output = 15.0
"""
)
"""The e2e config (which has ``fake-pooled``, a model whose own pool is not its host's) with
the default-price policy (a cheap price for unknown names, which a near-miss of a dear name
must not get) and a cheap and a dear Gemini model."""
if (
    'unknown_model = "default"' not in ATTACK_CONFIG
    or "[default_price]" not in ATTACK_CONFIG
    or '[models."fake-pooled"]' not in ATTACK_CONFIG
):
    raise RuntimeError("harness.CONFIG_TOML changed: update ATTACK_CONFIG's edits of it")

FREE_POST = re.compile(r"/v1/messages/count_tokens$|/models/[^/]+:countTokens$")
FREE_GET = re.compile(r"/models(?:/[^/]+)?$")
REFUSALS = {400, 401, 402, 403, 404, 405, 411, 413, 415, 421, 429, 431}
"""Statuses by which the proxy refuses a request (it must then not have forwarded it)."""


# -- the raw client ---------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What the client got: the final status (0 if none), headers, body, and how it ended."""

    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes
    timed_out: bool = False

    @property
    def from_upstream(self) -> bool:
        return self.headers.get("x-fake-upstream") == "1"

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.raw[:300]!r}{'…' if len(self.raw) > 300 else ''})"


def _chunked_end(data: bytes) -> int | None:
    """Where a chunked body ends in ``data`` (after its trailers), or None if not yet."""
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            return None
        try:
            size = int(data[pos:line_end].split(b";")[0].strip() or b"x", 16)
        except ValueError:
            return len(data)  # not chunked after all: take what came
        pos = line_end + 2
        if size == 0:
            end = data.find(b"\r\n\r\n", pos - 2)
            return None if end < 0 else end + 4
        pos += size + 2
        if pos > len(data):
            return None


def _head(data: bytes) -> tuple[int, dict[str, str], int] | None:
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        status = -1
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, end + 4


def exchange(
    port: int, data: bytes, read_bytes: int | None = None, timeout: float = ANSWER_TIMEOUT
) -> Answer:
    """Send ``data`` on a new connection and read one answer (past any 1xx but 101).

    With ``read_bytes`` the client closes after that many bytes of the answer."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the proxy answered and closed before taking the whole body
        start = 0
        timed_out = False
        while True:
            done = _complete(received, start)
            if isinstance(done, Answer):
                return done
            if done is not None:
                start = done  # an interim 1xx: the final answer follows
                continue
            if read_bytes is not None and len(received) >= read_bytes:
                break
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                timed_out = True
                break
            except OSError:
                break
            if not piece:
                break
            received += piece
    head = _head(received[start:])
    if head is None:
        return Answer(0, {}, b"", received, timed_out)
    status, headers, body_at = head
    return Answer(status, headers, received[start + body_at :], received, timed_out)


def _complete(received: bytes, start: int) -> Answer | int | None:
    """The whole answer if it is in, the start of the next head after a 1xx, or None."""
    head = _head(received[start:])
    if head is None:
        return None
    status, headers, body_at = head
    body = received[start + body_at :]
    if 100 <= status < 200 and status != 101:
        return start + body_at
    if status in (101, 204, 304):
        return Answer(status, headers, body, received) if status != 101 else None
    if "chunked" in headers.get("transfer-encoding", "").lower():
        end = _chunked_end(body)
        return None if end is None else Answer(status, headers, body[:end], received)
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        if len(body) >= int(length):
            return Answer(status, headers, body[: int(length)], received)
    return None  # read to the close


# -- requests ---------------------------------------------------------------------------
Header = tuple[bytes, bytes]


@dataclass(frozen=True)
class Attack:
    """One hostile request, as a template: ``{KEY}``/``{KEY2}`` become the example's keys
    (``{KEYPCT}``: the first key, every character percent-encoded)."""

    method: bytes
    target: bytes
    headers: tuple[Header, ...]
    body: bytes = b""
    framing: str = "length"
    """length | chunked | trailers | cl+te | two-cl | none | cut-head (the request head
    without its blank line, no body: a client that leaves mid-head)"""
    users: int = 1
    read_bytes: int | None = None
    """Close the connection after this many bytes of the answer (a client gone)."""
    label: str = ""
    """The variant this example attacks with (grouping in the long run's summary)."""

    def render(self, keys: list[str]) -> bytes:
        values = {b"{KEYPCT}": "".join(f"%{b:02X}" for b in keys[0].encode()).encode()}
        for i, key in enumerate(keys):
            values[b"{KEY}" if i == 0 else f"{{KEY{i + 1}}}".encode()] = key.encode()

        def fill(raw: bytes) -> bytes:
            for marker, value in values.items():
                raw = raw.replace(marker, value)
            return raw

        lines = [self.method + b" " + fill(self.target) + b" HTTP/1.1"]
        lines += [fill(name) + b": " + fill(value) for name, value in self.headers]
        body = fill(self.body)
        match self.framing:
            case "length":
                lines.append(b"Content-Length: %d" % len(body))
            case "chunked" | "trailers":
                lines.append(b"Transfer-Encoding: chunked")
            case "cl+te":
                lines += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
            case "two-cl":
                lines += [
                    b"Content-Length: %d" % len(body),
                    b"Content-Length: %d" % (len(body) + 1),
                ]
        if self.framing == "cut-head":
            return b"\r\n".join(lines) + b"\r\n"
        if self.framing in ("chunked", "trailers", "cl+te"):
            half = len(body) // 2
            chunks = [body[:half], body[half:]]
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n"
            body += b"x-trailer: 1\r\n\r\n" if self.framing == "trailers" else b"\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def describe(self) -> str:
        return f"{self.label}: {self.render(['{KEY}', '{KEY2}'])[:2000]!r}"


def json_body(value: object) -> bytes:
    return json.dumps(value).encode()


# -- the lab ----------------------------------------------------------------------------
class OutOfTime(BaseException):
    """The long run's time for a property is up (a BaseException: hypothesis lets it through
    at once instead of taking it for a failure to shrink)."""


class Violation(AssertionError):
    def __init__(self, invariant: str, message: str) -> None:
        super().__init__(f"{invariant}: {message}")
        self.invariant = invariant


@dataclass
class Finding:
    invariant: str
    prop: str
    label: str
    message: str
    example: str


@dataclass(repr=False)
class Lab:
    proxy: Proxy
    upstream: Upstream
    store: Store
    config: Config
    collect: bool = False
    """Record violations in ``findings`` instead of raising them (the long run)."""
    findings: list[Finding] = field(default_factory=list)
    answer_timeout: float = ANSWER_TIMEOUT
    settle_timeout: float = SETTLE_TIMEOUT
    examples: int = 0
    stop_at: float = float("inf")
    _count: int = 0

    def __repr__(self) -> str:
        return f"Lab(proxy :{self.proxy.port}, upstream :{self.upstream.port})"

    def out_of_time(self) -> bool:
        return time.monotonic() > self.stop_at

    def new_user(self) -> tuple[str, str]:
        self._count += 1
        user_id = f"attack-{self._count}-{os.getpid()}-{time.monotonic_ns()}"
        key = new_key()
        balances = {name: BALANCE for pool in self.config.pools.values() for name in pool.balance}
        self.store.create_user(user_id, hash_key(key), balances)
        return user_id, key

    def received_since(self, seq: int) -> tuple[int, list[dict[str, Any]]]:
        answer = httpx.get(f"{self.upstream.base_url}/__received?since={seq}", timeout=10).json()
        return int(answer["seq"]), list(answer["received"])

    def run(self, prop: str, attack: Attack) -> Answer:
        """Send ``attack`` as fresh users and check every invariant; returns the answer."""
        if self.out_of_time():
            raise OutOfTime
        self.examples += 1
        users = [self.new_user() for _ in range(attack.users)]
        keys = [key for _, key in users]
        seq = self._seq()
        output_at = self._output_size()
        answer = exchange(
            self.proxy.port, attack.render(keys), attack.read_bytes, self.answer_timeout
        )
        violations: list[Violation] = []
        try:
            self._check(attack, answer, users, seq, output_at, violations)
        except Violation as found:
            violations.append(found)
        for v in violations:
            if self.collect:
                self.findings.append(
                    Finding(v.invariant, prop, attack.label, str(v), attack.describe())
                )
        if violations and not self.collect:
            details = "\n".join(str(v) for v in violations)
            raise AssertionError(f"{details}\n  attack {attack.describe()}\n  answer {answer!r}")
        return answer

    def _seq(self) -> int:
        seq, _ = self.received_since(1 << 62)
        return seq

    def _output_size(self) -> tuple[int, int]:
        return self.proxy.stdout_path.stat().st_size, self.proxy.stderr_path.stat().st_size

    def _output_since(self, sizes: tuple[int, int]) -> bytes:
        """What mitmdump printed since ``_output_size`` said ``sizes``."""
        printed = b""
        for path, size in zip((self.proxy.stdout_path, self.proxy.stderr_path), sizes, strict=True):
            with path.open("rb") as f:
                f.seek(size)
                printed += f.read()
        return printed

    def _check(
        self,
        attack: Attack,
        answer: Answer,
        users: list[tuple[str, str]],
        seq: int,
        output_at: tuple[int, int],
        violations: list[Violation],
    ) -> None:
        user_ids = [u for u, _ in users]
        if answer.timed_out and attack.read_bytes is None:
            violations.append(Violation("I5", f"no answer within {self.answer_timeout}s"))
        self._barrier()
        _, records = self.received_since(seq)
        records = [r for r in records if not _is_liveness(r)]
        served = [r for r in records if r["served"]]
        forwarded = [r for r in records if not _free(r)]
        logs = self._settled(user_ids, max(len(served), len(forwarded)))
        holds = self._open_holds(user_ids)
        targets = [r["target"] for r in records]
        if len(served) > len(logs):
            violations.append(
                Violation(
                    "I1",
                    f"the upstream served {len(served)} generation request(s) {targets} "
                    f"but the store has {len(logs)} log(s)",
                )
            )
        if answer.status in REFUSALS and not answer.from_upstream and records:
            violations.append(
                Violation("I1", f"refused with {answer.status} yet forwarded: {targets}")
            )
        if holds:
            violations.append(Violation("I2", f"{len(holds)} hold(s) never settled: {holds}"))
        if len(forwarded) > len(logs):
            violations.append(
                Violation(
                    "I2",
                    f"{len(forwarded)} metered request(s) forwarded {targets}, {len(logs)} log(s)",
                )
            )
        if not holds:  # an open hold is in the balance: I2 already says so
            self._check_money(user_ids, logs, violations)
        self._check_keys([k for _, k in users], records, output_at, violations)
        if logs:  # served without any log: I1 already says so
            self._check_price(records, logs, violations)

    def _barrier(self) -> None:
        """I5: a plain valid request by a fresh user; once its log is in, so is every
        settlement journaled before it."""
        if self.proxy.proc is not None and self.proxy.proc.poll() is not None:
            raise Violation("I5", f"mitmdump exited with {self.proxy.proc.returncode}")
        user_id, key = self.new_user()
        live = Attack(
            b"POST",
            b"/v1/chat/completions",
            ((b"Host", b"openhands.test"), (b"Authorization", b"Bearer {KEY}"), LIVENESS_TAG),
            json_body({"model": "fake-gpt", "messages": [{"role": "user", "content": "ping"}]}),
        )
        answer = exchange(self.proxy.port, live.render([key]))
        if answer.status != 200:
            raise Violation("I5", f"a plain valid request after the example got {answer!r}")
        deadline = time.monotonic() + BARRIER_TIMEOUT
        while not self.store.logs(1, user_id):
            if time.monotonic() > deadline:
                raise Violation("I5", f"the liveness request was not logged in {BARRIER_TIMEOUT}s")
            time.sleep(POLL)

    def _settled(self, user_ids: list[str], wanted: int) -> list[Document]:
        """The users' logs once their holds are closed and ``wanted`` logs are in (bounded)."""
        deadline = time.monotonic() + self.settle_timeout
        while True:
            logs = [log for u in user_ids for log in self.store.logs(1000, u)]
            if len(logs) >= wanted and not self._open_holds(user_ids):
                return logs
            if time.monotonic() > deadline:
                return logs
            time.sleep(POLL)

    def _open_holds(self, user_ids: list[str]) -> list[str]:
        future = datetime(9999, 1, 1, tzinfo=UTC)
        return [
            f"{h.user_id}/{h.request_id} {h.amount}"
            for h in self.store.open_holds(future)
            if h.user_id in user_ids
        ]

    def _check_money(
        self, user_ids: list[str], logs: list[Document], violations: list[Violation]
    ) -> None:
        for user_id in user_ids:
            for name, pool in self.config.pools.items():
                charged = BALANCE * len(pool.balance) - self.store.balance(user_id, pool)
                costs = [
                    Decimal(str(log["creditsCost"]))
                    for log in logs
                    if log["userId"] == user_id and log["creditType"] == name
                ]
                if any(c < 0 for c in costs):
                    violations.append(Violation("I3", f"negative cost {costs} in {name}"))
                if sum(costs, Decimal(0)) != charged:
                    violations.append(
                        Violation(
                            "I3",
                            f"{user_id} {name}: balance down {charged}, logs say {sum(costs)} "
                            f"({len(costs)} log(s))",
                        )
                    )

    def _check_keys(
        self,
        keys: list[str],
        records: list[dict[str, Any]],
        output_at: tuple[int, int],
        violations: list[Violation],
    ) -> None:
        needles = {key: _needles(key) for key in keys}
        places: dict[str, bytes] = {}
        for r in records:
            seen = r["target"] + "\n" + json.dumps(r["headers"]) + "\n" + r["body"]
            raw = seen.encode("latin-1", "replace")
            places[f"upstream request {r['target'][:80]!r}"] = raw + b"\n" + unquote_to_bytes(raw)
        for path in self._written_files():
            places[str(path.name)] = path.read_bytes()
        places["proxy output"] = self._output_since(output_at)
        for forms in needles.values():
            for where, data in places.items():
                if any(form in data for form in forms):
                    violations.append(Violation("I4", f"a client key appears in {where}"))

    def _written_files(self) -> list[Path]:
        files = [self.proxy.journal_path, self.proxy.db_path]
        files += [Path(f"{self.proxy.db_path}{suffix}") for suffix in ("-wal", "-journal")]
        files += list(self.proxy.workdir.glob("*.rejected"))
        return [f for f in files if f.exists()]

    def _check_price(
        self, records: list[dict[str, Any]], logs: list[Document], violations: list[Violation]
    ) -> None:
        honest = [r for r in records if r["served"] and r["generated"]]
        if not honest:
            return
        charged = sum((Decimal(str(log["creditsCost"])) for log in logs), Decimal(0))
        pools = {log["creditType"] for log in logs}
        floor = sum((self._floor(r, pools) for r in honest), Decimal(0))
        if charged < floor:
            described = [(r["target"], r["models"], r["generated"]) for r in honest]
            violations.append(
                Violation(
                    "I6",
                    f"charged {charged} for generation worth at least {floor} "
                    f"(served {described}; logs "
                    f"{[(log['model'], log['creditType'], str(log['creditsCost'])) for log in logs]})",
                )
            )

    def _routes(self) -> list[Route]:
        default = self.config.default_route
        return [*self.config.routes, *([default] if default is not None else [])]

    def _route_multiplier(self, name: str, pools: set[str]) -> Decimal:
        """The least route multiplier the product's rule allows for ``name``: a model with
        a pool of its own bills at its ``route_multiplier``, else the dearest of the routes
        billing that pool; any other, the cheapest route to the pools that paid."""
        found = self.config.model(name)
        if found is not None and found[1].pool is not None:
            model = found[1]
            pooled = [r.multiplier for r in self._routes() if r.pool == model.pool]
            return model.route_multiplier or max(pooled)
        routes = [r for r in self._routes() if r.pool in pools] or self._routes()
        return min(r.multiplier for r in routes)

    def _floor(self, record: dict[str, Any], pools: set[str]) -> Decimal:
        generated = record["generated"]
        usage = UsageRecord(
            input_tokens=int(generated.get("input", 0)),
            output_tokens=int(generated.get("output", 0)),
        )
        names = [m for m in record["models"] if m] or ["unknown"]
        costs = []
        for name in names:
            quote = pricing.resolve_price(self.config, name, Decimal(1))
            found = self.config.model(name)
            own = found[1].multiplier if found is not None else Decimal(1)
            multiplier = self._route_multiplier(name, pools) * own
            costs.append(pricing.cost(usage, replace(quote, multiplier=multiplier)))
        return max(costs)


LIVENESS_TAG: Header = (b"x-attack-tag", b"liveness")


def _is_liveness(record: dict[str, Any]) -> bool:
    return any(k.lower() == "x-attack-tag" and v == "liveness" for k, v in record["headers"])


def _free(record: dict[str, Any]) -> bool:
    """A path that may pass uncharged, read as the upstream reads it."""
    path = resolve_target(record["target"])
    if record["method"] in ("GET", "HEAD"):
        return FREE_GET.search(path) is not None or record["served"] is None
    return record["method"] == "POST" and FREE_POST.search(path) is not None


def _needles(key: str) -> list[bytes]:
    """How a key can show: as is, its secret part, fully percent-encoded, base64."""
    secret = key.rpartition("-")[2]
    return [
        key.encode(),
        secret.encode(),
        "".join(f"%{b:02X}" for b in key.encode()).encode(),
        quote(key, safe="").encode(),
        base64.b64encode(key.encode())[:40],
    ]


# -- setting it up ----------------------------------------------------------------------
@contextmanager
def realistic_upstream(workdir: Path) -> Iterator[Upstream]:
    """``scripts/fake_upstream.py --realistic`` on a free port; its output goes to a file."""
    log_path = workdir / "upstream.out"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "fake_upstream.py"), "--port", "0"]
            + ["--realistic"],
            stdout=subprocess.PIPE,
            stderr=log,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # printed once the socket is bound
        if not line.startswith("listening on 127.0.0.1:"):
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        drain = threading.Thread(target=proc.stdout.read, daemon=True)  # never block it
        drain.start()
        port = int(line.rsplit(":", 1)[1])
        yield Upstream(f"http://127.0.0.1:{port}", port)
    finally:
        stop_process(proc)


@contextmanager
def attack_lab(workdir: Path, collect: bool = False) -> Iterator[Lab]:
    """The fake upstream, one mitmdump with the addon, and the store, for one module."""
    config_path = workdir / "attack.toml"
    config_path.write_text(ATTACK_CONFIG)
    config_path.chmod(0o600)
    config = load_config(config_path)
    with realistic_upstream(workdir) as upstream:
        proxy = Proxy(upstream, config_path, workdir / "attack.db", workdir)
        proxy.options["flow_detail"] = 2  # mitmdump prints each request: a key left in it shows
        proxy.start()
        store = open_store(proxy.db_url, config.pools)
        try:
            store.ensure_schema(config.log_ttl_days)
            lab = Lab(proxy, upstream, store, config, collect=collect)
            lab._barrier()  # the proxy serves before the first example
            yield lab
        finally:
            store.close()
            proxy.stop()
