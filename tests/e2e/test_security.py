"""Security end to end: no raw key anywhere the proxy writes, client keys never reach the
upstream (the route's own key does), legacy key forms work, unsafe configs are refused.

Runs its own proxy at mitmdump's default ``flow_detail=1`` (the session proxy is quiet), so
that the request lines mitmdump prints are searched too.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from burnmeter.config import Config
from burnmeter.documents import hash_key
from burnmeter.documents import new_key
from burnmeter.store import open_store
from burnmeter.store.base import Store
from scripts.processes import free_port
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import MITMDUMP
from tests.e2e.harness import OHMYGPT_HOST
from tests.e2e.harness import OHMYGPT_UPSTREAM_KEY
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import ROOT
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import wait_logs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

MESSAGES: list[Any] = [{"role": "user", "content": "Hi."}]
GEMINI = "/v1beta/models/fake-gpt:generateContent"
GEMINI_BODY = {"contents": [{"role": "user", "parts": [{"text": "Hi."}]}]}


def loud_proxy(upstream: Upstream, config_path: Path, workdir: Path) -> Proxy:
    """mitmdump's default flow_detail (request lines printed), on a wide "terminal":
    flow_detail=1 truncates URLs to its width, hiding query strings."""
    return Proxy(
        upstream,
        config_path,
        workdir / "burnmeter.db",
        workdir,
        options={"flow_detail": 1, "termlog_verbosity": "debug"},
        env={"COLUMNS": "500"},
    )


@dataclass
class Run:
    proxy: Proxy
    store: Store
    workdir: Path


@pytest.fixture(scope="module")
def run(
    upstream: Upstream, config: Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("security")
    config_path = workdir / "burnmeter.toml"
    config_path.write_text(CONFIG_TOML)
    config_path.chmod(0o600)
    proxy = loud_proxy(upstream, config_path, workdir)
    proxy.start()
    store = open_store(proxy.db_url, config.pools)
    store.ensure_schema(0)
    try:
        yield Run(proxy, store, workdir)
    finally:
        proxy.stop()
        store.close()


def user(store: Store, name: str, key_doc_id: str | None = None) -> str:
    """A user with 5 in each pool; its key (stored hashed unless ``key_doc_id`` says)."""
    key = new_key()
    balances = {"creditsNew": Decimal(5), "credits": Decimal(5)}
    store.create_user(name, key_doc_id or hash_key(key), balances)
    return key


def test_no_raw_key_anywhere_and_none_forwarded(
    run: Run, upstream: Upstream, config: Config
) -> None:
    store = run.store
    hashed = user(store, "sec-hashed")
    legacy = "sk-legacy-" + "7c1d" * 8  # an original user_keys document: _id = the raw key
    user(store, "sec-legacy", key_doc_id=legacy)
    api_key = "sk-apikey-" + "9e2f" * 8  # an original usersNew.apiKey
    user(store, "sec-apikey")
    store.set_fields("sec-apikey", {"apiKey": api_key})
    bad = [new_key() for _ in range(5)]

    upstream.reset()
    chat = {"model": "fake-gpt", "messages": MESSAGES}
    claude = {"model": "fake-claude", "max_tokens": 16, "messages": MESSAGES}
    av = {"anthropic-version": "2023-06-01"}
    sent: list[tuple[str, str, dict[str, Any], dict[str, str], int]] = [
        # host, path, body, headers, expected status
        (OPENHANDS_HOST, "/v1/chat/completions", chat, {"Authorization": f"Bearer {hashed}"}, 200),
        (
            OHMYGPT_HOST,
            "/v1/chat/completions",
            chat | {"stream": True},
            {"Authorization": f"Bearer {hashed}"},
            200,
        ),
        (OHMYGPT_HOST, "/v1/messages", claude, {"x-api-key": legacy, **av}, 200),
        (
            OPENHANDS_HOST,
            "/v1/messages",
            claude | {"stream": True},
            {"x-api-key": api_key, **av},
            200,
        ),
        (OPENHANDS_HOST, f"{GEMINI}?key={hashed}", GEMINI_BODY, {}, 200),
        (OHMYGPT_HOST, GEMINI, GEMINI_BODY, {"x-goog-api-key": legacy}, 200),
        (OPENHANDS_HOST, "/v1/chat/completions", chat, {"Authorization": f"Bearer {bad[0]}"}, 401),
        (OPENHANDS_HOST, "/v1/messages", claude, {"x-api-key": bad[1], **av}, 401),
        (OPENHANDS_HOST, "/v1/chat/completions", chat, {"x-api-key": bad[2]}, 401),
        (OPENHANDS_HOST, GEMINI, GEMINI_BODY, {"x-goog-api-key": bad[3]}, 401),
        (OPENHANDS_HOST, "/v1/models", {}, {"Authorization": f"Bearer {bad[4]}"}, 401),
        (OPENHANDS_HOST, "/v1/models", {}, {"Authorization": f"Bearer {legacy}"}, 200),
    ]
    with httpx.Client(base_url=run.proxy.base_url, timeout=10) as client:
        for host, path, body, headers, status in sent:
            method = "GET" if path == "/v1/models" else "POST"
            r = client.request(method, path, json=body or None, headers={"Host": host, **headers})
            assert r.status_code == status, (path, r.text)
            for key in [hashed, legacy, api_key, *bad]:
                assert key not in r.text, f"{path}: a key is echoed back to the client"

    # -- the upstream saw its own key on the ohmygpt route, and no client key anywhere
    recent = upstream.stats()["recent"]
    assert len(recent) == 7  # the 401s never reached it
    for seen in recent:
        text = json.dumps(seen)
        for key in [hashed, legacy, api_key, *bad]:
            assert key not in text, f"a client key reached the upstream: {seen}"
        if seen["host"] and seen["path"] != "/v1/models":
            credentials = [seen["authorization"], seen["x_api_key"], seen["x_goog_api_key"]]
            assert [c for c in credentials if c] in (
                [],
                [f"Bearer {OHMYGPT_UPSTREAM_KEY}"],
                [OHMYGPT_UPSTREAM_KEY],
            )
    upstream_keyed = [s for s in recent if OHMYGPT_UPSTREAM_KEY in json.dumps(s)]
    assert len(upstream_keyed) == 3  # the three ohmygpt requests, in each API's header

    # -- every request log, the mitmdump output and the database files: no raw key
    for name in ("sec-hashed", "sec-legacy", "sec-apikey"):
        wait_logs(store, name, 1)
    time.sleep(0.5)  # settlements and the terminal log
    logs = store.logs(1000)
    assert len(logs) >= 6
    documents = json.dumps(logs, default=str)
    output = run.proxy.output()
    assert "POST" in output and "/v1/chat/completions" in output, "flow lines not printed"
    files = {p.name: p.read_bytes() for p in run.workdir.iterdir() if p.is_file()}
    assert any(name.startswith("burnmeter.db") for name in files)
    for key in [hashed, legacy, api_key, *bad, OHMYGPT_UPSTREAM_KEY]:
        secret = key[-16:]
        assert secret not in documents, "a raw key in a request log"
        assert secret not in output, f"a raw key in mitmdump's output: {key[:10]}…"
        for name, data in files.items():
            if key in (legacy, api_key) and name.startswith("burnmeter.db"):
                continue  # the original's own documents hold these raw keys (docs/documents.md)
            assert secret.encode() not in data, f"a raw key in {name}"


def test_proxy_refuses_a_world_writable_config(upstream: Upstream, tmp_path: Path) -> None:
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(CONFIG_TOML)
    config_path.chmod(0o666)
    args = [
        str(MITMDUMP),
        "--listen-host",
        "127.0.0.1",
        "-p",
        str(free_port()),
        "-s",
        str(ROOT / "addons" / "metering.py"),
        "--mode",
        f"reverse:{upstream.base_url}",
        "--set",
        f"metering_config={config_path}",
        "--set",
        f"metering_db=sqlite:///{tmp_path / 'x.db'}",
    ]
    env = {**os.environ, "E2E_OHMYGPT_UPSTREAM_KEY": OHMYGPT_UPSTREAM_KEY}
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30, env=env)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    lines = [line for line in output.splitlines() if "world-writable" in line]
    assert lines, output
    assert f"{config_path}: world-writable config file refused" in lines[0]


def test_rejected_gemini_query_key_is_not_printed(run: Run) -> None:
    key = new_key()
    rejected = run.proxy.output().count("metering: anonymous · rejected: ")
    with httpx.Client(base_url=run.proxy.base_url, timeout=10) as client:
        r = client.post(f"{GEMINI}?key={key}", json=GEMINI_BODY, headers={"Host": OPENHANDS_HOST})
    assert r.status_code == 401
    # mitmdump prints a flow in its response hook, before the client has the answer; the
    # addon's line for it shows that this flow's output is in
    deadline = time.monotonic() + 10
    while run.proxy.output().count("metering: anonymous · rejected: ") == rejected:
        assert time.monotonic() < deadline, "the rejected flow's line was never printed"
        time.sleep(0.05)
    assert key[-16:] not in run.proxy.output()
