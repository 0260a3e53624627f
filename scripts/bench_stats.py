#!/usr/bin/env python3
"""Time every report over a large SQLite store, and ``burnmeter serve`` over it.

Generates N request logs (default 1,000,000: 300 users, both default pools, ~2% legacy
logs without creditType, six models) spread over the 60 days up to the end of yesterday
in the reporting zone, so that "24h", read then, is a whole day; bulk-inserts them
straight into SQLite; then times each report (median of 3 runs), each admin endpoint of a
real ``burnmeter serve`` over HTTP and, when Debian's Chromium is there, the dashboard's
first paint with data in it (a fresh navigation to ``/admin``, until the cards are
drawn, and until the whole page is); prints a table or JSON. The targets: < 1 s for 24h and
for ``logs``, < 3 s for ``all`` and for the dashboard's first paint.

    python scripts/bench_stats.py [--logs N] [--db PATH] [--format table|json]
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import click

from burnmeter.config import default_config
from burnmeter.periods import day_start
from burnmeter.periods import now_utc
from burnmeter.periods import window
from burnmeter.reports import reports_for
from burnmeter.store.base import LOGS
from burnmeter.store.extjson import to_ms
from burnmeter.store.sqlite import SqliteStore

DAYS = 60
CHUNK = 50_000
USERS = [f"user{n:03d}" for n in range(300)]
MODELS = [
    "claude-sonnet-4-5",
    "claude-opus-4-1",
    "gpt-5",
    "gpt-5-mini",
    "gemini-2.5-pro",
    "glm-4.6",
]
POOLS = [("openhands", "chat.trollllm.xyz"), ("ohmygpt", "chat2.trollllm.xyz")]
LEGACY_SHARE = 0.02
COLUMNS = [
    "_id", "userId", "userKeyId", "model", "inputTokens", "outputTokens", "cacheWriteTokens",
    "cacheHitTokens", "reasoningTokens", "creditsCost", "creditType", "tokensUsed", "statusCode",
    "latencyMs", "ttftMs", "isSuccess", "createdAt", "host", "upstream", "path", "stream",
    "usageSource",
]  # fmt: skip
LIMITS = {"24h": 1.0, "all": 3.0}
ENDPOINTS = ["user-stats", "metrics", "model-stats", "users", "series"]
TOKEN = "bench-admin-token"
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def generate(path: Path, count: int, end_ms: int) -> None:
    """``count`` logs in [end - 60 days, end), in time order, with a progress line."""
    rng = random.Random(5)
    span = DAYS * 86_400_000
    sql = f"INSERT INTO {LOGS} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    started = time.perf_counter()
    for first in range(0, count, CHUNK):
        rows = []
        for n in range(first, min(count, first + CHUNK)):
            pool, host = rng.choice(POOLS)
            inp, out = rng.randint(50, 20_000), rng.randint(10, 4_000)
            ok = rng.random() > 0.03
            rows.append((
                f"req-{n:09d}", rng.choice(USERS), "sk-burn…a1b2", rng.choice(MODELS), inp, out,
                rng.randint(0, 2_000), rng.randint(0, 30_000), rng.randint(0, out // 2),
                (inp * 3 + out * 15) * 1_000 if ok else 0,
                None if rng.random() < LEGACY_SHARE else pool, inp + out,
                200 if ok else 502, rng.randint(200, 60_000), rng.randint(100, 5_000), int(ok),
                end_ms - span + n * span // count, host, "api.anthropic.com", "/v1/messages",
                1, "reported",
            ))  # fmt: skip
        conn.execute("BEGIN")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
        done = first + len(rows)
        rate = done / (time.perf_counter() - started)
        print(
            f"\rinserted {done:,}/{count:,} logs ({rate:,.0f}/s)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    conn.execute("ANALYZE")
    conn.close()


def median_seconds(run: Callable[[], Any], times: int = 3) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def serve(path: Path) -> tuple[subprocess.Popen[str], str]:
    """``burnmeter serve`` over the store; its base URL once it printed it (it binds first)."""
    burnmeter = Path(sys.executable).parent / "burnmeter"
    env = {k: v for k, v in os.environ.items() if k not in ("BURNMETER_DB", "BURNMETER_CONFIG")}
    proc = subprocess.Popen(
        [str(burnmeter), "--db", f"sqlite:///{path}", "serve", "--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"burnmeter serve exited with {proc.wait()}")
    return proc, line.split()[-1].split("/admin")[0]


def fetch(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return bytes(response.read())


def time_server(path: Path, now: str) -> list[dict[str, Any]]:
    """Each endpoint and the dashboard page over HTTP, then the dashboard in Chromium."""
    proc, base = serve(path)
    results: list[dict[str, Any]] = []
    try:
        for period in ("24h", "all"):
            query = f"?period={period}&now={now}"
            for name in ENDPOINTS:
                url = f"{base}/admin/{name}{query}"
                results.append({"report": f"GET /admin/{name}", "period": period,
                                "seconds": median_seconds(partial(fetch, url)),
                                "limit": LIMITS[period]})  # fmt: skip
            results.append({"report": "GET /admin (whole page)", "period": period,
                            "seconds": median_seconds(partial(fetch, f"{base}/admin{query}")),
                            "limit": None})  # fmt: skip
        if os.path.exists(CHROMIUM):
            painted, complete = paint_seconds(base, now)
            results.append({"report": "dashboard first paint", "period": "all",
                            "seconds": painted, "limit": LIMITS["all"]})  # fmt: skip
            results.append({"report": "dashboard complete", "period": "all",
                            "seconds": complete, "limit": None})  # fmt: skip
        else:
            print(f"no {CHROMIUM}: the dashboard's first paint is not timed", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(15)
    return results


def paint_seconds(base: str, now: str) -> tuple[float, float]:
    """Medians, from a fresh tab's navigation to ``/admin?period=all``, until the cards (the
    first section the server sends, with their numbers) are painted, and until the whole page
    (chart and tables too) is (Chromium started beforehand)."""
    from playwright.sync_api import sync_playwright

    painted: list[float] = []
    complete: list[float] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            for _ in range(3):
                context = browser.new_context(
                    extra_http_headers={"Authorization": f"Bearer {TOKEN}"}
                )
                page = context.new_page()
                started = time.perf_counter()
                page.goto(f"{base}/admin?period=all&now={now}", wait_until="commit")
                page.wait_for_selector("[data-metric=total_burned]", timeout=60_000)
                page.evaluate("new Promise(done => requestAnimationFrame(() => done(null)))")
                painted.append(time.perf_counter() - started)
                page.wait_for_selector("footer", timeout=60_000)
                page.evaluate("new Promise(done => requestAnimationFrame(() => done(null)))")
                complete.append(time.perf_counter() - started)
                context.close()
        finally:
            browser.close()
    return statistics.median(painted), statistics.median(complete)


@click.command()
@click.option(
    "--logs",
    "count",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    metavar="N",
    help="How many request logs to generate.",
)
@click.option(
    "--db",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench-stats.db"),
    show_default=True,
    help="SQLite file to (re)create.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Results as an aligned table or JSON.",
)
def main(count: int, path: Path, fmt: str) -> None:
    """Generate N logs into a fresh SQLite store and time every report on them."""
    config = default_config()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    store = SqliteStore(path, config.pools)
    store.ensure_schema(0)
    now = day_start(now_utc(), config.zone) - timedelta(milliseconds=1)  # 24h: a whole day
    generate(path, count, to_ms(now))
    reports = reports_for(store)
    results: list[dict[str, Any]] = []
    for period in ("24h", "all"):
        span = window(period, config.zone, now)
        cases: dict[str, Callable[[], Any]] = {
            "summary": partial(reports.summary, span),
            "users": partial(reports.users, span),
            "models": partial(reports.models, span),
            "series (hour)": partial(reports.series, span, "hour"),
        }
        for name, run in cases.items():
            results.append({"report": name, "period": period, "seconds": median_seconds(run),
                            "limit": LIMITS[period]})  # fmt: skip
    results.append({"report": "logs (100)", "period": "-",
                    "seconds": median_seconds(lambda: store.logs(100)), "limit": 1.0})  # fmt: skip
    store.close()
    results += time_server(path, now.astimezone(config.zone).replace(tzinfo=None).isoformat())
    if fmt == "json":
        click.echo(json.dumps({"logs": count, "results": results}, indent=2))
        return
    click.echo(f"{count:,} logs over {DAYS} days in {path}; median of 3 runs")
    click.echo(f"{'report':<24} {'period':<6} {'seconds':>8}  target")
    for r in results:
        if r["limit"] is None:  # the whole dashboard: no target, only its first paint has one
            target = "-"
        else:
            target = f"< {r['limit']:g} s " + ("ok" if r["seconds"] < r["limit"] else "SLOW")
        click.echo(f"{r['report']:<24} {r['period']:<6} {r['seconds']:>8.3f}  {target}")


if __name__ == "__main__":
    main()
