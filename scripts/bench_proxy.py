"""Metering overhead against bare mitmproxy, measured side by side on 127.0.0.1.

    python scripts/bench_proxy.py [--quick] [--pairs N] [--format table|json] [--scale-out]
        [--metrics] [--durable]

Starts the fake upstream (scripts/fake_upstream.py), then in turn (a) mitmdump in reverse mode
with a stream-passthrough script (the honest baseline: SSE streamed, nothing parsed) and (b)
mitmdump with addons/metering.py on a fresh SQLite store, with a real account, holds,
settlements and logs. Runs are interleaved A B A B ...; each run drives the same load (JSON and
SSE at concurrency 16 after a warm-up, sequential SSE for time to first byte, and N concurrent
slow streams for memory). mitmdump is pinned to CPU 1, the upstream and this load generator to
CPU 0. After every metered run the store is checked: one log per request that got a 200, and
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from burnmeter.config import load_config  # noqa: E402
from burnmeter.documents import hash_key  # noqa: E402
from burnmeter.documents import new_key  # noqa: E402
from burnmeter.store import open_store  # noqa: E402
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


@dataclass(frozen=True)
class Load:
    json_requests: int
    sse_requests: int
    sequential: int
    open_streams: int
    concurrency: int = 16
    events: int = 20


FULL = Load(json_requests=3000, sse_requests=1500, sequential=300, open_streams=500)
QUICK = Load(json_requests=400, sse_requests=200, sequential=60, open_streams=200)


@dataclass
class RunResult:
    kind: str
    json_rps: float = 0.0
    json_p50_ms: float = 0.0
    json_p99_ms: float = 0.0
    sse_rps: float = 0.0
    sse_p50_ms: float = 0.0
    sse_p99_ms: float = 0.0
    ttfb_p50_ms: float = 0.0
    ttfb_p99_ms: float = 0.0
    peak_rss_mb: float = 0.0
    errors: int = 0
    requests_ok: int = 0
    logs: int | None = None
    cost_matches: bool | None = None
    scraped_cost: float | None = None
    """Σ burnmeter_cost_usd_total (runs with metrics)."""


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


async def drive(
    url: str, headers: dict[str, str], body: dict[str, Any], n: int, conc: int
) -> Stats:
    stats = Stats()
    payload = json.dumps(body).encode()
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


def request_body(load: Load, stream: bool, delay_ms: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "bench-model", "messages": MESSAGES, "x_chunks": load.events}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if delay_ms:
        body["x_delay_ms"] = delay_ms
    return body


async def measure(port: int, key: str, load: Load, result: RunResult) -> int:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}", "Host": HOST, "Content-Type": "application/json"}
    sent_ok = 0
    warm = await drive(url, headers, request_body(load, True), 50, load.concurrency)
    sent_ok += warm.ok
    j = await drive(url, headers, request_body(load, False), load.json_requests, load.concurrency)
    s = await drive(url, headers, request_body(load, True), load.sse_requests, load.concurrency)
    seq = await drive(url, headers, request_body(load, True, delay_ms=2), load.sequential, 1)
    slow = await drive(
        url, headers, request_body(load, True, delay_ms=100), load.open_streams, load.open_streams
    )
    for stats in (j, s, seq, slow):
        sent_ok += stats.ok
        result.errors += stats.errors
    result.json_rps = j.ok / j.elapsed
    result.json_p50_ms, result.json_p99_ms = pct(j.latencies, 0.5), pct(j.latencies, 0.99)
    result.sse_rps = s.ok / s.elapsed
    result.sse_p50_ms, result.sse_p99_ms = pct(s.latencies, 0.5), pct(s.latencies, 0.99)
    result.ttfb_p50_ms, result.ttfb_p99_ms = pct(seq.ttfbs, 0.5), pct(seq.ttfbs, 0.99)
    return sent_ok


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


def run(kind: str, load: Load, upstream_port: int, workdir: Path) -> RunResult:
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
    try:
        result.requests_ok = asyncio.run(measure(port, key, load, result))
        result.peak_rss_mb = peak_rss_mb(proc.pid)
        if kind == "metrics":
            result.scraped_cost = scraped_cost(metrics_port)
    finally:
        stop_process(proc)
    if kind != "baseline":
        check_store(db_url, workdir, user, result.requests_ok, result)
    return result


def ratios(pairs: list[tuple[RunResult, RunResult]]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    return {
        "json_rps": med([m.json_rps / b.json_rps for b, m in pairs]),
        "sse_rps": med([m.sse_rps / b.sse_rps for b, m in pairs]),
        "added_ttfb_p50_ms": med([m.ttfb_p50_ms - b.ttfb_p50_ms for b, m in pairs]),
        "added_json_p50_ms": med([m.json_p50_ms - b.json_p50_ms for b, m in pairs]),
        "added_peak_rss_mb": med([m.peak_rss_mb - b.peak_rss_mb for b, m in pairs]),
    }


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
    headers = {"Authorization": f"Bearer {key}", "Host": HOST, "Content-Type": "application/json"}
    body = request_body(load, False)
    try:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                drive(
                    f"http://127.0.0.1:{p}/v1/chat/completions",
                    headers,
                    body,
                    load.json_requests,
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
    cols = [
        ("kind", "kind", "{}"),
        ("json_rps", "JSON req/s", "{:.0f}"),
        ("json_p50_ms", "JSON p50", "{:.1f}"),
        ("json_p99_ms", "JSON p99", "{:.1f}"),
        ("sse_rps", "SSE req/s", "{:.0f}"),
        ("sse_p50_ms", "SSE p50", "{:.1f}"),
        ("ttfb_p50_ms", "TTFB p50", "{:.2f}"),
        ("ttfb_p99_ms", "TTFB p99", "{:.2f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
        ("errors", "errors", "{}"),
        ("logs", "logs", "{}"),
        ("cost_matches", "Σcost=Δbalance", "{}"),
    ]
    rows = [[title for _, title, _ in cols]]
    for pair in pairs:
        for r in pair:
            rows.append([fmt.format(getattr(r, name)) for name, _, fmt in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    lines.append("")
    lines += [f"{k}: {v}" for k, v in summary.items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="a run under 60 s (2 pairs, less load)"
    )
    parser.add_argument("--pairs", type=int, help="interleaved baseline/metered pairs (default 5)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--scale-out", action="store_true", help="also 2 metered processes, 1 file")
    parser.add_argument(
        "--metrics", action="store_true", help="also metered with metering_metrics on, per pair"
    )
    parser.add_argument(
        "--durable", action="store_true", help="also metered with metering_durable on, per pair"
    )
    args = parser.parse_args()
    load = QUICK if args.quick else FULL
    n_pairs = args.pairs or (2 if args.quick else 5)
    upstream, upstream_port = start_upstream()
    pin(os.getpid(), 0)
    pairs: list[tuple[RunResult, RunResult]] = []
    with_metrics: list[tuple[RunResult, RunResult]] = []  # (metered, metered with metrics)
    durable: list[tuple[RunResult, RunResult]] = []  # (metered, metered durable)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
            workdir = Path(tmp)
            for _ in range(n_pairs):
                base = run("baseline", load, upstream_port, workdir)
                metered = run("metered", load, upstream_port, workdir)
                pairs.append((base, metered))
                if args.metrics:
                    with_metrics.append((metered, run("metrics", load, upstream_port, workdir)))
                if args.durable:
                    durable.append((metered, run("durable", load, upstream_port, workdir)))
            summary: dict[str, Any] = {"ratios_metered_over_baseline": ratios(pairs)}
            if with_metrics:
                summary["ratios_metrics_over_metered"] = ratios(with_metrics)
            if durable:
                summary["ratios_durable_over_metered"] = ratios(durable)
            if args.scale_out:
                summary["scale_out"] = asyncio.run(scale_out(load, upstream_port, workdir))
    finally:
        stop_process(upstream)
    metered_runs = [m for _, m in pairs] + [m for _, m in (*with_metrics, *durable)]
    complete = all(
        m.errors == 0 and m.logs == m.requests_ok and m.cost_matches for m in metered_runs
    )
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
