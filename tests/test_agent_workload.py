"""The benchmark's agent-shaped requests: the stated size and shape, the same bytes on every
run, and admitted by the metering addon as the streamed, priced requests they stand for."""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons.metering import Metering
from addons.phases import Admitted
from burnmeter.config import load_config
from burnmeter.documents import hash_key
from burnmeter.estimate import estimate_input_tokens
from burnmeter.store import open_store
from scripts import agent_workload
from scripts.bench_proxy import CONFIG
from scripts.bench_proxy import HOST
from scripts.bench_proxy import MODEL
from scripts.bench_proxy import POOL_FIELD
from tests.addon_support import make_flow

KEY = "sk-burn-bench-0123456789abcdef"
Generator = Callable[..., bytes]
CASES = [
    pytest.param(
        agent_workload.anthropic_messages, 200_000, "/v1/messages", "x-api-key", id="anthropic"
    ),
    pytest.param(
        agent_workload.openai_chat, 100_000, "/v1/chat/completions", "authorization", id="openai"
    ),
]


@pytest.fixture
def metering(tmp_path: Path) -> Iterator[Metering]:
    config_path = tmp_path / "bench.toml"
    config_path.write_text(CONFIG)
    db_url = f"sqlite:///{tmp_path / 'bench.db'}"
    store = open_store(db_url, load_config(config_path).pools)
    store.ensure_schema(0)
    store.create_user("bench", hash_key(KEY), {POOL_FIELD: Decimal(1_000)})
    store.close()
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.configure(m, metering_config=str(config_path), metering_db=db_url)
        yield m
        m.done()


@pytest.mark.parametrize(("generate", "target", "path", "key_header"), CASES)
def test_size_and_shape(generate: Generator, target: int, path: str, key_header: str) -> None:
    raw = generate(MODEL)
    assert abs(len(raw) - target) <= target * agent_workload.SIZE_TOLERANCE
    assert generate(MODEL) == raw  # deterministic
    body = json.loads(raw)
    assert len(body["tools"]) == 20
    assert body["stream"] is True and body["x_chunks"] == agent_workload.EVENTS
    roles = [m["role"] for m in body["messages"]]
    assert roles.count("assistant") == 60
    smaller = generate(MODEL, target_bytes=target // 2)
    assert abs(len(smaller) - target // 2) <= target // 2 * agent_workload.SIZE_TOLERANCE


@pytest.mark.parametrize(("generate", "target", "path", "key_header"), CASES)
async def test_the_proxy_admits_it(
    metering: Metering, generate: Generator, target: int, path: str, key_header: str
) -> None:
    raw = generate(MODEL)
    f = make_flow(path, raw, key=KEY, key_header=key_header, host=HOST)
    await metering.requestheaders(f)
    await metering.request(f)
    assert f.response is None  # not answered locally: forwarded
    admitted = metering.phases[f]
    assert isinstance(admitted, Admitted) and admitted.stream and admitted.hold is not None
    assert admitted.request.api == ("anthropic.messages" if "messages" in path else "openai.chat")
    assert estimate_input_tokens(admitted.api, json.loads(raw)) > target // 8
