"""Every forwarded request ends with a settlement: at the stream's end event, when the
client leaves before the usage, under concurrency (holds bound the cost), after journal
and store failures. Each test runs its own mitmdump on its own files (``Site``)."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from burnmeter.estimate import estimate_request
from burnmeter.estimate import hold_amounts
from burnmeter.pricing import resolve_price
from burnmeter.store import open_store
from scripts.processes import peak_rss_mb
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import Upstream
from tests.e2e.harness import wait_logs
from tests.e2e.test_reliability import START
from tests.e2e.test_reliability import Site
from tests.e2e.test_reliability import running_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture(name="site")
def site_fixture(upstream: Upstream, tmp_path: Path) -> Iterator[Site]:
    with running_site(upstream, tmp_path) as made:
        yield made


MESSAGES = [{"role": "user", "content": "Think hard, then answer briefly."}]
PRICES = {"input": Decimal(2), "output": Decimal(8)}  # fake-gpt, USD per million
MULTIPLIER = Decimal("1.02")  # the openhands route
CHAT_PATH = "/v1/chat/completions"


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    usd = input_tokens * PRICES["input"] + output_tokens * PRICES["output"]
    return usd / 1_000_000 * MULTIPLIER


def headers(key: str) -> dict[str, str]:
    return {"Host": OPENHANDS_HOST, "Authorization": f"Bearer {key}"}


def stream_until(
    base_url: str, key: str, body: dict[str, Any], stop: Any, then: Any = None
) -> list[str]:
    """Stream a chat completion and read lines until ``stop(line)``; ``then()`` runs
    before the connection closes."""
    seen: list[str] = []
    with httpx.Client(timeout=20) as client:
        with client.stream(
            "POST", base_url + CHAT_PATH, json=body, headers=headers(key)
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                seen.append(line)
                if stop(line):
                    break
            if then is not None:
                then()
    return seen


# -- class 10: settle at the terminal usage event -----------------------------------------
def test_a_stream_is_charged_at_its_usage_event_though_the_proxy_dies_before_it_ends(
    site: Site,
) -> None:
    alice = site.accounts.new(creditsNew=START)
    proxy = site.proxy()
    body = {
        "model": "fake-gpt",
        "messages": MESSAGES,
        "stream": True,
        "x_chunks": 7,
        "x_linger_ms": 30_000,  # usage and [DONE] sent, then the message is held open
    }
    seen = stream_until(proxy.base_url, alice.key, body, lambda line: line == "data: [DONE]",
                        then=proxy.kill)  # fmt: skip
    assert seen[-1] == "data: [DONE]"
    site.proxy()  # the same journal and database: what was journaled is applied
    [log] = wait_logs(site.store, alice.user_id, 1)
    assert log["usageSource"] == "reported" and log["outputTokens"] == 7
    assert log["statusCode"] == 200 and log["creditsCost"] > 0
    assert site.spent(alice) == log["creditsCost"]


# -- class 7: a client gone before the usage -----------------------------------------------
def test_a_client_gone_before_a_reasoning_streams_usage_pays_more_than_it_saw(
    site: Site,
) -> None:
    """The visible text is 3 tokens; the usage event, 10 s later, would report 5,000 (hidden
    reasoning). The client leaves after the last word."""
    alice = site.accounts.new(creditsNew=START)
    proxy = site.proxy()
    body = {
        "model": "fake-gpt",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 6000,
        "x_chunks": 3,
        "x_usage": {
            "completion_tokens": 5000,
            "completion_tokens_details": {"reasoning_tokens": 4997},
        },
        "x_usage_delay_ms": 10_000,
    }
    seen = stream_until(
        proxy.base_url, alice.key, body, lambda line: '"finish_reason": "stop"' in line
    )
    assert not any('"completion_tokens"' in line for line in seen), "left before the usage"
    [log] = wait_logs(site.store, alice.user_id, 1)
    assert log["statusCode"] == 499 and log["usageSource"] == "estimated"
    assert log["creditsCost"] >= cost(0, 5000), "charged at least what the upstream bills"
    assert site.spent(alice) == log["creditsCost"]
    assert proxy.stop() == 0


# -- class 6: holds bound the cost ---------------------------------------------------------
PARALLEL = 12
CJK_PROMPT = [{"role": "user", "content": "漢字仮名交じり文を書いてください。" * 60}]
"""The fake reports 1.5 tokens per CJK character (its \\u escapes / 4); chars / 4 is 6x less."""


def test_parallel_requests_on_a_balance_for_n_holds_overdraw_by_at_most_one_request(
    upstream: Upstream, tmp_path: Path
) -> None:
    """No output limit named, each request would generate 20,000 tokens (the case that overdrew:
    20 such requests took +0.67 to -2.6), and a CJK prompt undercounted by chars / 4."""
    with running_site(
        upstream, tmp_path, "default_max_output_tokens = 1000\n" + CONFIG_TOML
    ) as site:
        body = {"model": "fake-gpt", "messages": CJK_PROMPT, "x_chunks": 20_000}
        config = site.config
        estimate = estimate_request("openai.chat", body, config, CHAT_PATH, "fake-gpt")
        hold, _ = hold_amounts(estimate, resolve_price(config, "fake-gpt", MULTIPLIER))
        balance = PARALLEL * hold
        alice = site.accounts.new(creditsNew=balance)
        proxy = site.proxy()

        def one(_: int) -> int:
            response = httpx.post(
                proxy.base_url + CHAT_PATH, json=body, headers=headers(alice.key), timeout=30
            )
            return response.status_code

        with ThreadPoolExecutor(PARALLEL) as pool:
            statuses = list(pool.map(one, range(PARALLEL)))
        assert statuses.count(200) >= 1 and set(statuses) <= {200, 402}
        logs = wait_logs(site.store, alice.user_id, statuses.count(200))
        left = site.store.balance(alice.user_id, config.pools["openhands"])
        worst = max(log["creditsCost"] for log in logs)
        assert left >= -worst, f"{left} after {len(logs)} requests of up to {worst}"
        assert sum(log["creditsCost"] for log in logs) == balance - left
        assert all(log["outputTokens"] <= 1000 for log in logs), "capped at the held limit"
        assert proxy.stop() == 0


# -- class 13: a store whose file vanished or was replaced ----------------------------------
def chat_status(base_url: str, key: str) -> int:
    body = {"model": "fake-gpt", "messages": MESSAGES, "max_tokens": 50}
    return httpx.post(base_url + CHAT_PATH, json=body, headers=headers(key), timeout=10).status_code


def test_a_store_file_replaced_under_the_proxy_is_an_outage_not_a_fresh_start(
    site: Site, tmp_path: Path
) -> None:
    alice = site.accounts.new(creditsNew=START)
    carol = site.accounts.new(creditsNew=START)  # valid, never looked up before
    proxy = site.proxy()
    assert chat_status(proxy.base_url, alice.key) == 200
    wait_logs(site.store, alice.user_id, 1)
    aside = tmp_path / "aside"
    aside.mkdir()
    for part in tmp_path.glob("burnmeter.db*"):
        part.rename(aside / part.name)
    fresh = open_store(f"sqlite:///{proxy.db_path}", site.config.pools)
    fresh.ensure_schema(0)  # as a CLI run against the path would leave it
    assert chat_status(proxy.base_url, carol.key) == 503
    served = 1 + sum(chat_status(proxy.base_url, alice.key) == 200 for _ in range(3))
    assert fresh.logs(100) == [], "no charge written into the fresh file"
    fresh.close()
    assert proxy.output().count("deleted or replaced: not writing to it") == 1
    for part in tmp_path.glob("burnmeter.db*"):
        part.unlink()
    for part in aside.glob("burnmeter.db*"):
        part.rename(tmp_path / part.name)
    logs = wait_logs(site.store, alice.user_id, served)
    assert len(logs) == served
    assert sum(log["creditsCost"] for log in logs) == site.spent(alice)
    assert chat_status(proxy.base_url, carol.key) == 200, "the store is back"
    assert proxy.stop() == 0


# -- class 9: bounded request bodies whatever the framing ----------------------------------
def send_chunked(port: int, key: str, chunk: bytes, count: int) -> bytes:
    """POST a chunked body of ``count`` chunks; the head of what the proxy answered (it may
    answer, and stop reading, before the body is all sent)."""
    head = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {OPENHANDS_HOST}\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(head + f"{1:x}\r\n".encode() + b"{\r\n")
        try:
            for _ in range(count):
                if select.select([conn], [], [], 0)[0]:  # answered before the end
                    break
                conn.sendall(frame)
            else:
                conn.sendall(b"0\r\n\r\n")
        except OSError:  # refused mid-body: the answer is already there
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer and (data := conn.recv(65536)):
                answer += data
        except OSError:
            pass
    return answer


def test_a_chunked_body_far_over_the_limit_is_413_with_memory_bounded(
    upstream: Upstream, tmp_path: Path
) -> None:
    with running_site(
        upstream, tmp_path, f"max_request_bytes = {1024 * 1024}\n" + CONFIG_TOML
    ) as site:
        alice = site.accounts.new(creditsNew=START)
        proxy = site.proxy()
        assert proxy.proc is not None
        before = peak_rss_mb(proxy.proc.pid)
        upstream.reset()
        answer = send_chunked(proxy.port, alice.key, b" " * 65536, 4096)  # 256 MiB
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        grown_mib = peak_rss_mb(proxy.proc.pid) - before
        assert grown_mib < 64, f"peak RSS grew {grown_mib:.0f} MiB for a 256 MiB body"
        assert upstream.stats()["total"] == 0
        assert chat_status(proxy.base_url, alice.key) == 200, "the proxy keeps serving"
        assert proxy.stop() == 0


# -- class 2: settlement cannot be lost to an exception --------------------------------------
def raw_request(port: int, head: bytes, body: bytes) -> bytes:
    """Send bytes no HTTP client library would (a Host that is not UTF-8); the answer, read
    to the end (the request asks for ``Connection: close``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        answer = b""
        while data := conn.recv(65536):
            answer += data
    return answer


def test_a_host_that_is_not_utf8_is_charged_or_refused_and_the_drain_closes_every_hold(
    site: Site,
) -> None:
    """Through the real mitmdump: the request is refused locally (free, never forwarded) or
    charged; a stream with such a Host still open at SIGTERM is settled by the drain."""
    alice = site.accounts.new(creditsNew=START)
    proxy = site.proxy()
    hostile = OPENHANDS_HOST.encode() + b"\xff"
    head = (
        b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: " + hostile + b"\r\n"
        b"Authorization: Bearer " + alice.key.encode() + b"\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
    )
    body = {"model": "fake-gpt", "messages": MESSAGES, "max_tokens": 50}
    answer = raw_request(proxy.port, head, json.dumps(body).encode())
    status = int(answer.split(b" ", 2)[1])
    assert status == 200 or 400 <= status < 500, answer[:300]
    if status == 200:
        wait_logs(site.store, alice.user_id, 1)

    streaming = threading.Event()

    def long_stream() -> None:
        stream = {**body, "stream": True, "x_chunks": 5000, "x_delay_ms": 2}
        data = json.dumps(stream).encode()
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as conn:
                conn.sendall(head + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                while conn.recv(65536):
                    streaming.set()
        except OSError:
            pass
        streaming.set()

    reader = threading.Thread(target=long_stream)
    reader.start()
    assert streaming.wait(10)
    assert proxy.stop() == 0, "the drain finished"
    reader.join(10)
    assert site.open_holds() == [], "no hold outlives the proxy"
    logs = site.store.logs(100, alice.user_id)
    assert sum(log["creditsCost"] for log in logs) == site.spent(alice)
    if status == 200:
        cut = [log for log in logs if log["statusCode"] == 503]
        assert cut and cut[0]["creditsCost"] > 0 and cut[0]["host"].endswith("\ufffd")
    assert "Traceback" not in proxy.output()
