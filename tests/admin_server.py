"""Seeded stores and a real ``burnmeter serve`` subprocess, for the admin server's tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from burnmeter.config import load_config
from burnmeter.store.base import Store
from burnmeter.store.sqlite import SqliteStore
from scripts.processes import stop_process
from tests.admin_seed import CONFIG
from tests.admin_seed import USER_DOCS
from tests.admin_seed import log_docs

BURNMETER = Path(sys.executable).parent / "burnmeter"
TOKEN = "test-admin-token-3f9c2d"


def seed(store: Store) -> None:
    for doc in USER_DOCS:
        store.import_user(doc)
    for doc in log_docs():
        store.import_log(doc)


def seeded_sqlite(directory: Path) -> tuple[Path, Path]:
    """A config file and a SQLite store holding the seed, closed again."""
    config = directory / "burnmeter.toml"
    config.write_text(CONFIG)
    db = directory / "admin.db"
    store = SqliteStore(db, load_config(config).pools)
    store.ensure_schema(0)
    seed(store)
    store.close()
    return config, db


@dataclass
class Server:
    proc: subprocess.Popen[str]
    base: str  # http://127.0.0.1:PORT
    start_line: str

    def get(self, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        """GET with the bearer token; the status and the decoded JSON body."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(self.base + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> tuple[int, str]:
        code = stop_process(self.proc)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def start_server(config: Path, db: Path, *args: str, token: str | None = TOKEN) -> Server:
    """``burnmeter serve`` on a free port; ready once it printed its address (it binds first)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BURNMETER_DB", "BURNMETER_CONFIG")}
    command = [str(BURNMETER), "--db", f"sqlite:///{db}", "--config", str(config), "serve"]
    command += ["--port", "0", *args] + (["--token", token] if token else [])
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()  # blocks until the server listens, or it exits
    if not line:
        proc.wait(10)
        raise RuntimeError(f"burnmeter serve exited {proc.returncode}: {proc.stderr.read()}")
    base = line.split()[-1].split("/admin")[0]
    return Server(proc, base, line.strip())


# -- the browser ---------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 15_000
PERIODS = ["1h", "2h", "3h", "4h", "8h", "24h", "3d", "7d", "30d", "all"]
MONEY_CARDS = {
    "total_credits_used",
    "total_creditsNewUsed",
    "total_burned",
    "burned_by_pool.openhands",
    "burned_by_pool.ohmygpt",
    "total_credits",
    "total_ref_credits",
    "total_creditsNew",
}


def require_browser() -> None:
    """Skips the calling test module without Chromium, except under CI (an error there)."""
    if os.path.exists(CHROMIUM):
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI: no browser at {CHROMIUM} (.ci/run installs Debian's chromium)")
    pytest.skip("no chromium on this machine", allow_module_level=True)


@contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (never a browser of its own)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def shown(metric: str, value: Any) -> str:
    """How the dashboard writes a number, spelled out here independently of its code."""
    if value is None:
        return "—"
    if metric in MONEY_CARDS:
        amount = Decimal(str(value)).quantize(Decimal("0.0001"))
        return ("-" if amount < 0 else "") + "$" + f"{abs(amount):,}"
    if metric == "success_rate":
        return f"{float(value):g}%"
    if metric == "avg_latency_ms":
        return f"{int(value):,} ms"
    return f"{int(value):,}"


def json_field(record: dict[str, Any], metric: str) -> Any:
    if metric.startswith("burned_by_pool."):
        return record["burned_by_pool"][metric.split(".", 1)[1]]
    return record[metric]


def cards(page: Any) -> dict[str, str]:
    """Every card on the page: {data-metric: its text}."""
    return {
        element.get_attribute("data-metric"): element.inner_text().strip()
        for element in page.query_selector_all("[data-metric]")
    }


def choose(page: Any, period: str) -> None:
    """Clicks a period button; returns once the page shows that period's numbers."""
    page.click(f"button[data-period='{period}']")
    page.wait_for_selector(
        f"main[aria-busy=false] button[data-period='{period}'][aria-pressed=true]"
    )
