"""Fixtures for the end-to-end tests: a fake upstream and a real mitmdump with the addon.

One fake upstream and one proxy serve the whole session; each test makes its own users.
Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from burnmeter.config import Config
from burnmeter.config import load_config
from burnmeter.store.base import Store
from scripts.processes import stop_process
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import ROOT
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import proxy_store


@pytest.fixture(scope="session")
def upstream() -> Iterator[Upstream]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "fake_upstream.py"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # printed once the socket is bound
        if not line.startswith("listening on 127.0.0.1:"):
            raise RuntimeError(f"fake upstream did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        yield Upstream(f"http://127.0.0.1:{port}", port)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def config_path(e2e_dir: Path) -> Path:
    path = e2e_dir / "burnmeter.toml"
    path.write_text(CONFIG_TOML)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="session")
def config(config_path: Path) -> Config:
    return load_config(config_path)


@pytest.fixture(scope="session")
def proxy(upstream: Upstream, config_path: Path, e2e_dir: Path) -> Iterator[Proxy]:
    with Proxy(upstream, config_path, e2e_dir / "burnmeter.db", e2e_dir) as handle:
        yield handle


@pytest.fixture(scope="session")
def store(proxy: Proxy, config: Config) -> Iterator[Store]:
    """The proxy's SQLite file, opened by the test process as a second client."""
    with proxy_store(proxy, config) as opened:
        yield opened


@pytest.fixture(scope="session")
def accounts(store: Store) -> Accounts:
    return Accounts(store)
