"""Durable mode (``metering_durable``): the end of a response waits for its settlement's fsync.

mitmproxy sends the end of a response after awaiting the ``response`` hook: the whole body
of a plain response, the end of message of a streamed one (its chunked terminator, HTTP/2's
END_STREAM). These tests stand in for that: they hold the journal's fsync at a gate and
show the hook's awaitable is not done until the fsync of the flow's record has run.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from mitmproxy import flow
from mitmproxy import http
from mitmproxy.test import taddons

from addons.metering import Metering
from burnmeter.config import load_config
from burnmeter.documents import hash_key
from burnmeter.store import open_store
from tests.addon_support import CONFIG
from tests.addon_support import KEY
from tests.addon_support import Env
from tests.addon_support import admit
from tests.addon_support import chat_sse
from tests.addon_support import json_response
from tests.addon_support import make_flow
from tests.addon_support import settled
from tests.addon_support import streaming

CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}


class FsyncGate:
    """``os.fsync`` held until ``release``; ``events`` records each fsync once it returned."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.events: list[str] = []
        self._fsync = os.fsync

    def __call__(self, fd: int) -> None:
        self.entered.set()
        assert self.released.wait(10)
        self._fsync(fd)
        self.events.append("fsync")


def durable_env(tmp_path: Path, durable: bool) -> Iterator[Env]:
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(CONFIG)
    db_url = f"sqlite:///{tmp_path / 'burnmeter.db'}"
    store = open_store(db_url, load_config(config_path).pools)
    store.ensure_schema(0)
    store.create_user("alice", hash_key(KEY), {"creditsNew": Decimal(5)})
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.configure(
            m, metering_config=str(config_path), metering_db=db_url, metering_durable=durable
        )
        yield Env(m, tctx, store, db_url, config_path)
        m.done()
    store.close()


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[FsyncGate]:
    gate = FsyncGate()
    monkeypatch.setattr(os, "fsync", gate)
    yield gate
    gate.released.set()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    yield from durable_env(tmp_path, durable=True)


async def end_of_response(env: Env, f: http.HTTPFlow, gate: FsyncGate) -> None:
    """What mitmproxy does after the data: await the hook, then send the end."""
    pending = env.metering.response(f)
    assert pending is not None, "the record is not durable yet: the end must wait"
    task = asyncio.ensure_future(pending)
    assert gate.entered.wait(10)  # the syncer is inside the record's fsync
    for _ in range(20):  # let the loop run: the hook still waits, whatever the scheduling
        await asyncio.sleep(0)
    assert not task.done()
    gate.released.set()
    await task
    gate.events.append("end of response sent")


async def test_a_response_ends_after_its_settlement_is_fsynced(env: Env, gate: FsyncGate) -> None:
    f = make_flow()
    await admit(env, f)
    f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    env.metering.responseheaders(f)
    await end_of_response(env, f, gate)
    assert gate.events[:2] == ["fsync", "end of response sent"]
    log = settled(env, f.id)
    assert log is not None and log["creditsCost"] == Decimal("0.009")


async def test_a_stream_settled_at_its_end_event_ends_after_the_fsync(
    env: Env, gate: FsyncGate
) -> None:
    """The tap settles at ``[DONE]``; the stream's end of message waits for the fsync."""
    f, tap = await streaming(env)
    body = chat_sse(["Hel", "lo"], CHAT_USAGE)
    assert tap(body) + tap(b"") == body
    assert f not in env.metering.phases, "settled at the end event"
    await end_of_response(env, f, gate)
    assert gate.events[:2] == ["fsync", "end of response sent"]
    log = settled(env, f.id)
    assert log is not None and log["stream"] is True


async def test_a_flow_that_ends_in_error_is_settled_without_waiting(
    env: Env, gate: FsyncGate
) -> None:
    """No end of a response reaches the client: the hook returns while the fsync is held."""
    f = make_flow()
    await admit(env, f)
    f.error = flow.Error("client disconnected")
    assert env.metering.error(f) is None  # type: ignore[func-returns-value]
    assert gate.entered.wait(10) and not gate.events
    gate.released.set()
    assert settled(env, f.id) is not None


async def test_without_durable_mode_the_response_hook_returns_nothing_to_wait_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    for env in durable_env(tmp_path, durable=False):
        f = make_flow()
        await admit(env, f)
        f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
        env.metering.responseheaders(f)
        assert env.metering.response(f) is None
        assert env.metering.journal is not None and env.metering.journal.fsyncs == 0
