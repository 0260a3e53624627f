"""Seeded stores and a real ``burnmeter serve`` subprocess, for the admin server's tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
