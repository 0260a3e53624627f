"""Helpers for the end-to-end tests: the processes under test, accounts, log polling."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from burnmeter.config import Config
from burnmeter.documents import hash_key
from burnmeter.documents import new_key
from burnmeter.store import open_store
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from scripts.processes import free_port
from scripts.processes import stop_process
from scripts.processes import wait_for_line

ROOT = Path(__file__).resolve().parents[2]

MITMDUMP = Path(sys.executable).parent / "mitmdump"
LOG_TIMEOUT = 10.0
READY = "metering: ready: "
"""The addon's line once it serves: config and store open, options in force, listening."""

OPENHANDS_HOST = "openhands.test"
OHMYGPT_HOST = "ohmygpt.test"
OHMYGPT_UPSTREAM_KEY = "sk-upstream-" + "5eb1a7e0c2d94f31"  # what the proxy sends upstream

CONFIG_TOML = """\
unknown_model = "reject"
log_ttl_days = 0

[pools.openhands]
balance = ["creditsNew"]
used = "creditsNewUsed"
tokens = "tokensUserNew"
expires = "expiresAtNew"

[pools.ohmygpt]
balance = ["credits", "refCredits"]
used = "creditsUsed"
expires = "expiresAt"

[[routes]]
host = "openhands.test"
pool = "openhands"
multiplier = 1.02

[[routes]]
host = "ohmygpt.test"
pool = "ohmygpt"
multiplier = 1.15
upstream_key_env = "E2E_OHMYGPT_UPSTREAM_KEY"

[models."fake-gpt"]
input = 2.0
output = 8.0
cache_read = 0.5

[models."fake-claude"]
aliases = ["fake-claude-latest"]
input = 3.0
output = 15.0
cache_write = 3.75
cache_read = 0.3

[models."fake-embed"]
input = 0.1
output = 0.0

[models."fake-pooled"]
input = 2.0
output = 8.0
pool = "ohmygpt"                 # billed at ohmygpt's multiplier whichever host is called
"""


@dataclass
class Upstream:
    base_url: str
    port: int

    def stats(self) -> dict[str, Any]:
        """The fake's counters, not counting this call's own connection."""
        stats = dict(httpx.get(self.base_url + "/__stats", timeout=5).json())
        stats["connections"] -= 1
        return stats

    def reset(self) -> None:
        httpx.post(self.base_url + "/__reset", timeout=5).raise_for_status()


@dataclass
class Proxy:
    """A running ``mitmdump -s addons/metering.py`` in reverse mode."""

    upstream: Upstream
    config_path: Path
    db_path: Path
    workdir: Path
    port: int = field(default_factory=free_port)
    options: dict[str, object] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def journal_path(self) -> Path:
        """One per process: the settlement journal cannot be shared."""
        return self.workdir / "burnmeter.journal"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / "mitmdump.out"

    @property
    def stderr_path(self) -> Path:
        return self.workdir / "mitmdump.err"

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(
            errors="replace"
        )

    def start(self) -> None:
        """Start mitmdump and wait for the addon's ready line (its store and journal open,
        its options in force, mitmproxy listening), never for the port alone; ``options``
        add to or replace the ``--set`` values below.

        (mitmdump ignores an addon option given twice and then runs without the addon,
        so each option appears once.)"""
        settings: dict[str, object] = {
            "metering_config": self.config_path,
            "metering_db": self.db_url,
            "metering_journal": self.journal_path,
            "connection_strategy": "lazy",
            # quiet about flows (-q), but keep the addon's info lines for the key-leak test
            "flow_detail": 0,
            "termlog_verbosity": "info",
            **self.options,
        }
        args = [
            str(MITMDUMP),
            "--listen-host",
            "127.0.0.1",
            "-s",
            str(ROOT / "addons" / "metering.py"),
        ]
        args += ["--mode", f"reverse:{self.upstream.base_url}@{self.port}"]
        for name, value in settings.items():
            args += ["--set", f"{name}={value}"]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "E2E_OHMYGPT_UPSTREAM_KEY": OHMYGPT_UPSTREAM_KEY,
            **self.env,
        }
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            start = out.tell()  # a restart appends to the same files: its own lines only
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=err, env=env)

        def since_start() -> str:
            with self.stdout_path.open("rb") as out:
                out.seek(start)
                return out.read().decode(errors="replace") + self.stderr_path.read_text(
                    errors="replace"
                )

        wait_for_line(self.proc, since_start, READY)

    def stop(self) -> int:
        """SIGTERM: mitmdump runs ``done()``, which drains the settlement writer."""
        assert self.proc is not None
        return stop_process(self.proc)

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def proxy_store(proxy: Proxy, config: Config) -> Iterator[Store]:
    """The proxy's SQLite file, opened by the test process as a second client (its schema
    made here too: the port can be open before the addon made it)."""
    opened = open_store(proxy.db_url, config.pools)
    opened.ensure_schema(config.log_ttl_days)
    try:
        yield opened
    finally:
        opened.close()


@dataclass(frozen=True)
class Account:
    user_id: str
    key: str


class Accounts:
    """Fresh users for each test; remembers every key used so the leak test can look for it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys: list[str] = []
        self._count = 0

    def new(self, **balances: str | Decimal) -> Account:
        self._count += 1
        account = Account(f"e2e-user-{self._count}-{os.getpid()}", new_key())
        amounts = {name: Decimal(value) for name, value in balances.items()}
        self.store.create_user(account.user_id, hash_key(account.key), amounts)
        self.keys.append(account.key)
        return account

    def unknown_key(self) -> str:
        key = new_key()
        self.keys.append(key)
        return key


def wait_logs(
    store: Store,
    user_id: str,
    count: int,
    where: Callable[[Document], bool] = lambda log: True,
    timeout: float = LOG_TIMEOUT,
) -> list[Document]:
    """The user's logs once ``count`` of them match ``where`` (the proxy writes them later)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = store.logs(1000, user_id)
        if sum(1 for log in logs if where(log)) >= count:
            return logs
        if time.monotonic() > deadline:
            raise AssertionError(f"{user_id}: {len(logs)} logs after {timeout}s, wanted {count}")
        time.sleep(0.05)
