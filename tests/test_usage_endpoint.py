"""``GET /burnmeter/usage``: who may ask, and what it answers (a real SQLite store)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from addon_support import KEY
from addon_support import alice_store
from addon_support import make_flow
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.test import tutils

from addons import usage_endpoint
from addons.metering import Metering
from addons.usage_endpoint import UsageEndpoint
from addons.usage_endpoint import is_usage_request
from addons.usage_endpoint import key_style
from burnmeter import periods
from burnmeter.documents import request_log
from burnmeter.records import UsageRecord
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store

NOW = periods.now_utc()


@pytest.fixture
def endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[UsageEndpoint, Store]]:
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    config_path, db_url, store = alice_store(
        tmp_path, creditsNew=Decimal("5.5"), credits=Decimal(3)
    )
    store.set_fields("alice", {"expiresAtNew": datetime(2030, 1, 2, tzinfo=UTC)})
    metering = Metering()
    usage = UsageEndpoint(metering)
    with taddons.context(usage, metering) as tctx:
        tctx.configure(metering, metering_config=str(config_path), metering_db=db_url)
        yield usage, store
        usage.done()
        metering.done()
    store.close()


def spend(
    store: Store, request_id: str, cost: str, ago: timedelta, pool: str = "openhands"
) -> None:
    log = request_log(
        request_id=request_id,
        user_id="alice",
        key_mask="sk-…",
        model="gpt-4o",
        usage=UsageRecord(input_tokens=1, output_tokens=1),
        cost=Decimal(cost),
        billing_tokens=2,
        pool=pool,
        status_code=200,
        latency_ms=5,
        ttft_ms=None,
        host="h",
        upstream="u",
        path="/v1/chat/completions",
        stream=False,
        created_at=NOW - ago,
    )
    store.settle([Settlement(request_id, "alice", pool, Decimal(cost), 2, 1, 1, None, log)])


def usage_flow(
    key: str | None = KEY, method: str = "GET", header: str = "authorization"
) -> http.HTTPFlow:
    f = make_flow("/burnmeter/usage", key=key, key_header=header)
    f.request.method = method
    return f


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/burnmeter/usage", True),
        ("/burnmeter/usage?x=1", True),
        ("/burnmeter/usage/", False),
        ("/burnmeter/usage/../../v1/chat/completions", False),
        ("/BURNMETER/usage", False),
        ("/v1/burnmeter/usage", False),
    ],
)
def test_is_usage_request(path: str, expected: bool) -> None:
    assert is_usage_request(tutils.treq(path=path.encode())) is expected


def test_key_style() -> None:
    assert key_style(usage_flow(header="x-api-key").request) == "anthropic"
    assert key_style(usage_flow().request) == "openai"


def test_read_sums_each_window_over_every_pool(endpoint: tuple[UsageEndpoint, Store]) -> None:
    usage, store = endpoint
    spend(store, "now", "0.25", timedelta(minutes=1))
    spend(store, "today", "0.5", timedelta(minutes=2), pool="ohmygpt")
    spend(store, "days", "1", timedelta(days=3))
    spend(store, "weeks", "2", timedelta(days=20))
    spend(store, "old", "4", timedelta(days=40))
    settings = usage.metering.settings
    assert settings is not None
    start = periods.window("24h", settings.config.zone, NOW).start
    assert start is not None
    owner = store.find_key(KEY)
    assert owner is not None
    body = json.loads(usage.read(owner))
    # 24h starts at local midnight: the logs a minute or two old may be from yesterday
    today = [
        cost for cost, ago in (("0.25", 1), ("0.5", 2)) if NOW - timedelta(minutes=ago) >= start
    ]
    assert body == {
        "user": "alice",
        "balances": {"openhands": pytest.approx(5.5 - 0.25 - 1 - 2 - 4), "ohmygpt": 2.5},
        "expires": {"openhands": "2030-01-02T00:00:00+00:00", "ohmygpt": None},
        "spent": {
            "1h": 0.75,
            "24h": pytest.approx(float(sum(map(Decimal, today), Decimal(0)))),
            "7d": 1.75,
            "30d": 3.75,
        },
        "requests": {"24h": len(today)},
    }


async def test_answers_the_key_owner_locally(endpoint: tuple[UsageEndpoint, Store]) -> None:
    usage, _ = endpoint
    f = usage_flow()
    await usage.requestheaders(f)
    assert f.response is not None and f.response.status_code == 200
    assert json.loads(f.response.content or b"")["user"] == "alice"
    assert "authorization" not in f.request.headers
    assert f.metadata["metering"]["outcome"] == "passthrough"
    await usage.metering.requestheaders(f)  # the metering addon leaves it alone
    assert f.response.status_code == 200


@pytest.mark.parametrize(
    "flow, status",
    [
        (lambda: usage_flow(key=None), 401),
        (lambda: usage_flow(key="sk-nobody-0000000000"), 401),
        (lambda: usage_flow(method="POST"), 405),
    ],
)
async def test_refusals(endpoint: tuple[UsageEndpoint, Store], flow, status: int) -> None:
    usage, _ = endpoint
    f = flow()
    await usage.requestheaders(f)
    assert f.response is not None and f.response.status_code == status
    assert "error" in json.loads(f.response.content or b"")
    assert f.metadata["metering"] == {
        "outcome": "rejected",
        "status": status,
        "reason": f.metadata["metering"]["reason"],
        "api": "burnmeter.usage",
        "pool": "",
    }


async def test_an_answer_is_reused_briefly(
    endpoint: tuple[UsageEndpoint, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage, store = endpoint
    first = usage_flow()
    await usage.requestheaders(first)
    spend(store, "later", "1", timedelta(0))
    again = usage_flow()
    await usage.requestheaders(again)
    assert again.response and first.response
    assert again.response.content == first.response.content
    monkeypatch.setattr(usage_endpoint, "CACHE_SECONDS", 0)
    fresh = usage_flow()
    await usage.requestheaders(fresh)
    assert fresh.response and fresh.response.content != first.response.content


async def test_other_paths_are_left_to_metering(endpoint: tuple[UsageEndpoint, Store]) -> None:
    usage, _ = endpoint
    f = make_flow()
    await usage.requestheaders(f)
    assert f.response is None and "metering" not in f.metadata


async def test_concurrent_asks_share_one_read(
    endpoint: tuple[UsageEndpoint, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage, _ = endpoint
    await usage.requestheaders(usage_flow())  # the key is cached: asking takes no thread hop
    monkeypatch.setattr(usage_endpoint, "CACHE_SECONDS", 0)  # answers are not reused
    reads: list[str] = []
    gate = threading.Event()
    real_read = usage.read

    def slow_read(owner: KeyOwner) -> bytes:
        reads.append(owner.user_id)
        gate.wait(10)
        return real_read(owner)

    monkeypatch.setattr(usage, "read", slow_read)
    flows = [usage_flow() for _ in range(5)]
    asks = asyncio.gather(*(usage.requestheaders(f) for f in flows))
    await asyncio.sleep(0)  # one loop pass: each ask runs until it waits for the read
    gate.set()
    await asks
    assert reads == ["alice"]
    bodies = {f.response.content for f in flows if f.response is not None}
    assert len(bodies) == 1 and len(flows) == 5
