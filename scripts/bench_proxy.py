"""Metering overhead against bare mitmproxy, measured side by side on 127.0.0.1.

    python scripts/bench_proxy.py [--quick] [--pairs N] [--format table|json] [--scale-out]
        [--metrics] [--durable] [--workload NAME ...] [--py-spy DIR]

Starts the fake upstream (scripts/fake_upstream.py), then in turn (a) mitmdump in reverse mode
with a stream-passthrough script (the honest baseline: SSE streamed, nothing parsed) and (b)
mitmdump with addons/metering.py on a fresh SQLite store, with a real account, holds,
settlements and logs. Runs are interleaved A B A B ...; each run drives the same load after a
warm-up: per workload (``WORKLOADS``: small JSON, small SSE, and the coding-agent-shaped
requests of scripts/agent_workload.py) a batch at concurrency 16 for throughput, then
sequential requests for the latency one request adds (time to first byte and whole
response); then N concurrent slow streams for memory. Per pair, the ratio of throughputs and
the differences of latencies; the summary gives their medians. A streamed workload's added
time per event is (added whole-response time - added time to first byte) / events, from the
sequential requests; the tap's own cost per event is also timed in this process, on the
workload's stream as the upstream sends it fed one event at a time (as paced generation
arrives). mitmdump is pinned to CPU 1, the upstream and this load generator to
CPU 0.

``--py-spy DIR`` samples every metered mitmdump for its whole run (py-spy, non-blocking, 250
Hz, per thread; raw collapsed stacks in DIR): py-spy takes CPU 0 meanwhile, so such a run's
figures are for the profile, not for the table. It needs py-spy in this Python's
environment (``pip install py-spy``; attaching needs root or ptrace rights). After every metered run the store is checked: one log per request that got a 200, and
Σ creditsCost equal to the balance change; a run that drops writes is reported as failed.
With ``--metrics`` each pair gains a third run, (c) metered with ``metering_metrics`` on (scraped
once at the end, its Σ burnmeter_cost_usd_total checked against the logs), compared with (b).
With ``--durable`` each pair gains a run (d) metered with ``metering_durable=true`` (each
settlement fsynced before its response ends), compared with (b) the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from addons.streamtap import StreamTap  # noqa: E402
from burnmeter.config import load_config  # noqa: E402
from burnmeter.documents import hash_key  # noqa: E402
from burnmeter.documents import new_key  # noqa: E402
from burnmeter.store import open_store  # noqa: E402
from scripts import agent_workload  # noqa: E402
from scripts.bench_sse import by_event  # noqa: E402
from scripts.bench_sse import time_tap  # noqa: E402
from scripts.processes import free_port  # noqa: E402
from scripts.processes import peak_rss_mb  # noqa: E402
from scripts.processes import stop_process  # noqa: E402
from scripts.processes import wait_for_port  # noqa: E402

MITMDUMP = Path(sys.executable).parent / "mitmdump"
HOST = "bench.test"
POOL_FIELD = "creditsNew"
BALANCE = Decimal(1_000_000)
CONFIG = f"""\
log_ttl_days = 0
[[routes]]
host = "{HOST}"
pool = "openhands"
multiplier = 1.02
[models."bench-model"]
input = 3.0
output = 15.0
cache_read = 0.3
"""
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark, twenty tokens please."}]
MODEL = "bench-model"
SMALL_EVENTS = 20
TAP_REPEATS = 15


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    body: bytes
    events: int
    """Content events of a streamed answer; 0 for a JSON answer."""
    key_header: str
    api: str
    seq_delay_ms: int = 0
    """The upstream's pause between events on the sequential requests."""

    def headers(self, key: str) -> dict[str, str]:
        value = key if self.key_header == "x-api-key" else f"Bearer {key}"
        return {self.key_header: value, "Host": HOST, "Content-Type": "application/json"}

    def sequential_body(self) -> bytes:
        if not self.seq_delay_ms:
            return self.body
        return json.dumps(json.loads(self.body) | {"x_delay_ms": self.seq_delay_ms}).encode()


def small_body(stream: bool, delay_ms: int = 0) -> bytes:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "x_chunks": SMALL_EVENTS}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if delay_ms:
        body["x_delay_ms"] = delay_ms
    return json.dumps(body).encode()


CHAT = "/v1/chat/completions"
WORKLOADS = (
    Workload("small-json", CHAT, small_body(False), 0, "Authorization", "openai.chat"),
    # paced (2 ms between events) when sequential: each event its own read, as from an LLM
    Workload("small-sse", CHAT, small_body(True), SMALL_EVENTS, "Authorization", "openai.chat", 2),
    Workload(
        "agent-anthropic",
        "/v1/messages",
        agent_workload.anthropic_messages(MODEL),
        agent_workload.EVENTS,
        "x-api-key",
        "anthropic.messages",
    ),
    Workload(
        "agent-openai",
        CHAT,
        agent_workload.openai_chat(MODEL),
        agent_workload.EVENTS,
        "Authorization",
        "openai.chat",
    ),
)
BY_NAME = {w.name: w for w in WORKLOADS}


@dataclass(frozen=True)
class Load:
    requests: dict[str, int]
    """Requests per workload at ``concurrency``."""
    sequential: dict[str, int]
    open_streams: int
    concurrency: int = 16
    warm_up: int = 10
    """Requests per workload before the measured ones."""


FULL = Load(
    requests={"small-json": 3000, "small-sse": 1500, "agent-anthropic": 400, "agent-openai": 600},
    sequential={"small-json": 200, "small-sse": 200, "agent-anthropic": 60, "agent-openai": 60},
    open_streams=500,
)
QUICK = Load(
    requests={"small-json": 400, "small-sse": 200, "agent-anthropic": 60, "agent-openai": 80},
    sequential={"small-json": 40, "small-sse": 40, "agent-anthropic": 15, "agent-openai": 15},
    open_streams=200,
)


@dataclass
class WorkloadResult:
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    seq_ttfb_p50_ms: float = 0.0
    seq_ttfb_p99_ms: float = 0.0
    seq_total_p50_ms: float = 0.0
    seq_total_p99_ms: float = 0.0


@dataclass
class RunResult:
    kind: str
    workloads: dict[str, WorkloadResult] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    errors: int = 0
    requests_ok: int = 0
    logs: int | None = None
    cost_matches: bool | None = None
    scraped_cost: float | None = None
    """Σ burnmeter_cost_usd_total (runs with metrics)."""
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The machine's 1, 5 and 15 minute load averages at the end of the run."""


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: int = 0
    ok: int = 0
    elapsed: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def pin(pid: int, cpu: int) -> None:
    if (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(pid, {cpu})


# -- load ------------------------------------------------------------------------------------


async def one(session: aiohttp.ClientSession, url: str, body: bytes, stats: Stats) -> None:
    start = time.perf_counter()
    try:
        async with session.post(url, data=body) as response:
            first = await response.content.readany()
            stats.ttfbs.append(time.perf_counter() - start)
            async for _ in response.content.iter_any():
                pass
            if response.status != 200 or not first:
                stats.errors += 1
                return
    except aiohttp.ClientError:
        stats.errors += 1
        return
    stats.latencies.append(time.perf_counter() - start)
    stats.ok += 1


async def drive(url: str, headers: dict[str, str], payload: bytes, n: int, conc: int) -> Stats:
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=conc)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout
    ) as session:
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                await one(session, url, payload, stats)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        stats.elapsed = time.perf_counter() - start
    return stats


async def measure(
    port: int, key: str, load: Load, workloads: list[Workload], result: RunResult
) -> int:
    base = f"http://127.0.0.1:{port}"
    sent_ok = 0
    runs: list[Stats] = []
    for w in workloads:
        url, headers = base + w.path, w.headers(key)
        warm = await drive(url, headers, w.body, load.warm_up, min(load.warm_up, load.concurrency))
        batch = await drive(url, headers, w.body, load.requests[w.name], load.concurrency)
        seq = await drive(url, headers, w.sequential_body(), load.sequential[w.name], 1)
        sent_ok += warm.ok
        runs += [batch, seq]
        result.workloads[w.name] = WorkloadResult(
            rps=batch.ok / batch.elapsed,
            p50_ms=pct(batch.latencies, 0.5),
            p99_ms=pct(batch.latencies, 0.99),
            seq_ttfb_p50_ms=pct(seq.ttfbs, 0.5),
            seq_ttfb_p99_ms=pct(seq.ttfbs, 0.99),
            seq_total_p50_ms=pct(seq.latencies, 0.5),
            seq_total_p99_ms=pct(seq.latencies, 0.99),
        )
    slow = small_body(True, delay_ms=100)
    sse = BY_NAME["small-sse"]
    runs.append(await drive(base + sse.path, sse.headers(key), slow, *[load.open_streams] * 2))
    for stats in runs:
        sent_ok += stats.ok
        result.errors += stats.errors
    return sent_ok


# -- the tap, in this process ------------------------------------------------------------------


async def upstream_stream(upstream_port: int, w: Workload) -> bytes:
    """The workload's answer as the upstream sends it (no proxy)."""
    url = f"http://127.0.0.1:{upstream_port}{w.path}"
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url, data=w.body, headers={"Content-Type": "application/json"}
        ) as r:
            return await r.read()


def tap_us_per_event(api: str, stream: bytes) -> float:
    """µs per SSE event of the proxy's stream tap, fed one event per call; median of repeats."""
    events = by_event(stream)
    tap = StreamTap(api)
    for event in [*events, b""]:
        tap(event)
    assert tap.usage.done and tap.usage.result()[0] is not None, "the workload reports usage"
    return round(time_tap(api, events, TAP_REPEATS) / len(events) * 1e6, 2)


# -- processes -------------------------------------------------------------------------------


def start_upstream() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "fake_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on"):
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    pin(proc.pid, 0)
    return proc, int(line.rsplit(":", 1)[1])


def start_mitmdump(script_args: list[str], upstream_port: int, port: int, workdir: Path):
    log = workdir / f"mitmdump-{port}.log"
    args = [
        str(MITMDUMP),
        "-q",
        "--listen-host",
        "127.0.0.1",
        "--mode",
        f"reverse:http://127.0.0.1:{upstream_port}@{port}",
        "--set",
        "connection_strategy=lazy",
        *script_args,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    pin(proc.pid, 1)
    wait_for_port(port, proc, lambda: log.read_text(errors="replace"))
    return proc


def metered_args(workdir: Path, db_url: str) -> list[str]:
    config = workdir / "bench.toml"
    config.write_text(CONFIG)
    config.chmod(0o600)
    return [
        "-s",
        str(ROOT / "addons" / "metering.py"),
        "--set",
        f"metering_config={config}",
        "--set",
        f"metering_db={db_url}",
    ]


def new_account(db_url: str, workdir: Path) -> tuple[str, str]:
    config = load_config(workdir / "bench.toml")
    store = open_store(db_url, config.pools)
    store.ensure_schema(0)
    key = new_key()
    user = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    store.create_user(user, hash_key(key), {POOL_FIELD: BALANCE})
    store.close()
    return user, key


def check_store(db_url: str, workdir: Path, user: str, expected_logs: int, result: RunResult):
    config = load_config(workdir / "bench.toml")
    store = open_store(db_url, config.pools)
    try:
        logs = store.logs(expected_logs + 1000, user)
        charged = BALANCE - store.balance(user, config.pools["openhands"])
        result.logs = len(logs)
        logged = sum((log["creditsCost"] for log in logs), Decimal(0))
        result.cost_matches = logged == charged
        if result.scraped_cost is not None:  # float sums: equal to 1e-9
            result.cost_matches &= abs(result.scraped_cost - float(logged)) <= 1e-9 * float(logged)
    finally:
        store.close()


def scraped_cost(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("burnmeter_cost_usd_total")
    )


def start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).parent / "py-spy"
    args = [str(py_spy), "record", "--pid", str(pid), "--format", "raw", "--rate", "250"]
    args += ["--threads", "--nolineno", "--nonblocking", "--output", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pin(proc.pid, 0)
    return proc


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    """It writes its output once the process it samples is gone, or on SIGINT."""
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


def run(
    kind: str,
    load: Load,
    workloads: list[Workload],
    upstream_port: int,
    workdir: Path,
    profile_dir: Path | None = None,
) -> RunResult:
    result = RunResult(kind)
    port = free_port()
    db_url = f"sqlite:///{workdir / f'bench-{port}.db'}"
    metrics_port = free_port()
    if kind == "baseline":
        args = ["-s", str(ROOT / "scripts" / "stream_passthrough.py")]
        key = "unused"
    else:
        args = metered_args(workdir, db_url)
    if kind == "metrics":
        args += ["--set", f"metering_metrics=127.0.0.1:{metrics_port}"]
    if kind == "durable":
        args += ["--set", "metering_durable=true"]
    proc = start_mitmdump(args, upstream_port, port, workdir)
    if kind != "baseline":
        user, key = new_account(db_url, workdir)
    spy = None
    if profile_dir is not None and kind != "baseline":
        spy = start_py_spy(proc.pid, profile_dir / f"{kind}-{port}.txt")
    try:
        result.requests_ok = asyncio.run(measure(port, key, load, workloads, result))
        result.peak_rss_mb = peak_rss_mb(proc.pid)
        result.load_average = os.getloadavg()
        if kind == "metrics":
            result.scraped_cost = scraped_cost(metrics_port)
    finally:
        stop_process(proc)
        if spy is not None:
            stop_py_spy(spy)
    if kind != "baseline":
        check_store(db_url, workdir, user, result.requests_ok, result)
    return result


def ratios(pairs: list[tuple[RunResult, RunResult]], workloads: list[Workload]) -> dict[str, Any]:
    """Medians over pairs of (b)/(a) throughput and (b)-(a) latencies, per workload."""

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    out: dict[str, Any] = {}
    for w in workloads:
        per = [(b.workloads[w.name], m.workloads[w.name]) for b, m in pairs]
        row = {
            "rps": med([m.rps / b.rps for b, m in per]),
            "added_p50_ms": med([m.p50_ms - b.p50_ms for b, m in per]),
            "added_seq_ttfb_p50_ms": med([m.seq_ttfb_p50_ms - b.seq_ttfb_p50_ms for b, m in per]),
            "added_seq_total_p50_ms": med(
                [m.seq_total_p50_ms - b.seq_total_p50_ms for b, m in per]
            ),
        }
        if w.events:
            row["added_us_per_event"] = med(
                [
                    (
                        m.seq_total_p50_ms
                        - m.seq_ttfb_p50_ms
                        - b.seq_total_p50_ms
                        + b.seq_ttfb_p50_ms
                    )
                    * 1000
                    / w.events
                    for b, m in per
                ]
            )
        out[w.name] = row
    out["added_peak_rss_mb"] = med([m.peak_rss_mb - b.peak_rss_mb for b, m in pairs])
    return out


async def scale_out(load: Load, upstream_port: int, workdir: Path) -> dict[str, Any]:
    """Two metered processes on one SQLite file, each on its own port, driven together."""
    db_url = f"sqlite:///{workdir / 'scale-out.db'}"
    args = metered_args(workdir, db_url)
    ports = [free_port(), free_port()]
    procs = [
        start_mitmdump(
            [*args, "--set", f"metering_journal={workdir / f'scale-{port}.journal'}"],
            upstream_port,
            port,
            workdir,
        )
        for port in ports
    ]
    for cpu, proc in enumerate(procs):
        pin(proc.pid, cpu)
    user, key = new_account(db_url, workdir)
    small = BY_NAME["small-json"]
    try:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                drive(
                    f"http://127.0.0.1:{p}{small.path}",
                    small.headers(key),
                    small.body,
                    load.requests[small.name],
                    16,
                )
                for p in ports
            )
        )
        elapsed = time.perf_counter() - start
    finally:
        for proc in procs:
            stop_process(proc)
    ok = sum(r.ok for r in results)
    check = RunResult("scale-out")
    check_store(db_url, workdir, user, ok, check)
    return {
        "processes": 2,
        "json_rps": round(ok / elapsed, 1),
        "errors": sum(r.errors for r in results),
        "logs": check.logs,
        "requests_ok": ok,
        "cost_matches": check.cost_matches,
    }


def table(pairs: list[tuple[RunResult, ...]], summary: dict[str, Any]) -> str:
    cols: list[tuple[str, str, Callable[[RunResult, WorkloadResult], object]]] = [
        ("kind", "{}", lambda r, w: r.kind),
        ("req/s", "{:.0f}", lambda r, w: w.rps),
        ("p50", "{:.1f}", lambda r, w: w.p50_ms),
        ("p99", "{:.1f}", lambda r, w: w.p99_ms),
        ("seq TTFB p50", "{:.2f}", lambda r, w: w.seq_ttfb_p50_ms),
        ("seq total p50", "{:.2f}", lambda r, w: w.seq_total_p50_ms),
        ("seq total p99", "{:.2f}", lambda r, w: w.seq_total_p99_ms),
        ("RSS MB", "{:.0f}", lambda r, w: r.peak_rss_mb),
        ("errors", "{}", lambda r, w: r.errors),
        ("logs", "{}", lambda r, w: r.logs),
        ("Σcost=Δbalance", "{}", lambda r, w: r.cost_matches),
        ("load avg", "{:.2f}", lambda r, w: r.load_average[0]),
    ]
    lines = []
    for name in pairs[0][0].workloads:
        rows = [[title for title, _, _ in cols]]
        for pair in pairs:
            for r in pair:
                rows.append([fmt.format(get(r, r.workloads[name])) for _, fmt, get in cols])
        widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        lines.append(f"{name} (ms)")
        lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
        lines.append("")
    lines += [f"{k}: {v}" for k, v in summary.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a run of about a minute (2 pairs, less load)"
    )
    parser.add_argument("--pairs", type=int, help="interleaved baseline/metered pairs (default 5)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--scale-out", action="store_true", help="also 2 metered processes, 1 file")
    parser.add_argument(
        "--metrics", action="store_true", help="also metered with metering_metrics on, per pair"
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="profile each metered run into DIR"
    )
    parser.add_argument(
        "--workload",
        action="append",
        choices=list(BY_NAME),
        help="only this workload (repeatable; default: all)",
    )
    parser.add_argument(
        "--durable", action="store_true", help="also metered with metering_durable on, per pair"
    )
    args = parser.parse_args()
    load = QUICK if args.quick else FULL
    workloads = [BY_NAME[name] for name in args.workload] if args.workload else list(WORKLOADS)
    n_pairs = args.pairs or (2 if args.quick else 5)
    upstream, upstream_port = start_upstream()
    pin(os.getpid(), 0)
    pairs: list[tuple[RunResult, RunResult]] = []
    with_metrics: list[tuple[RunResult, RunResult]] = []  # (metered, metered with metrics)
    durable: list[tuple[RunResult, RunResult]] = []  # (metered, metered durable)
    try:
        taps = {
            w.name: tap_us_per_event(w.api, asyncio.run(upstream_stream(upstream_port, w)))
            for w in workloads
            if w.events
        }
        with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
            workdir = Path(tmp)
            for _ in range(n_pairs):
                base = run("baseline", load, workloads, upstream_port, workdir)
                metered = run("metered", load, workloads, upstream_port, workdir, args.py_spy)
                pairs.append((base, metered))
                if args.metrics:
                    metrics = run("metrics", load, workloads, upstream_port, workdir, args.py_spy)
                    with_metrics.append((metered, metrics))
                if args.durable:
                    durable_run = run("durable", load, workloads, upstream_port, workdir)
                    durable.append((metered, durable_run))
            summary: dict[str, Any] = {
                "ratios_metered_over_baseline": ratios(pairs, workloads),
                "tap_us_per_event_in_process": taps,
            }
            if with_metrics:
                summary["ratios_metrics_over_metered"] = ratios(with_metrics, workloads)
            if durable:
                summary["ratios_durable_over_metered"] = ratios(durable, workloads)
            if args.scale_out:
                summary["scale_out"] = asyncio.run(scale_out(load, upstream_port, workdir))
    finally:
        stop_process(upstream)
    metered_runs = [m for _, m in pairs] + [m for _, m in (*with_metrics, *durable)]
    complete = all(
        m.errors == 0 and m.logs == m.requests_ok and m.cost_matches for m in metered_runs
    )
    averages = [r.load_average[0] for pair in pairs for r in pair]
    summary["load_average_1m"] = {"min": min(averages), "max": max(averages)}
    summary["request_bytes"] = {w.name: len(w.body) for w in workloads}
    summary["load"] = asdict(load)
    summary["writes_complete"] = complete
    if args.format == "json":
        runs = [[asdict(b), asdict(m)] for b, m in pairs]
        out = {
            "runs": runs,
            "metrics_runs": [asdict(m) for _, m in with_metrics],
            "durable_runs": [asdict(m) for _, m in durable],
            **summary,
        }
        print(json.dumps(out, indent=2))
    else:
        print(table([*pairs, *((m,) for _, m in (*with_metrics, *durable))], summary))
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
