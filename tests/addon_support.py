"""Helpers for the addon's unit tests: flows, responses and streams to feed the hooks."""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import connection
from mitmproxy import http
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons.metering import Metering
from addons.streamtap import StreamTap
from burnmeter.config import load_config
from burnmeter.documents import hash_key
from burnmeter.journal import Journal
from burnmeter.store import open_store
from burnmeter.store.base import Store

KEY = "sk-burn-alice-0123456789abcdef"
BOB_KEY = "sk-burn-bob-0123456789abcdef"
OPENHANDS_HOST = "chat.trollllm.xyz"
OHMYGPT_HOST = "chat2.trollllm.xyz"
PORT_ROUTE = 8005

CONFIG = f"""\
unknown_model = "reject"
max_request_bytes = 4096
key_cache_seconds = 30

[default_route]
pool = "ohmygpt"
multiplier = 1

[[routes]]
host = "{OPENHANDS_HOST}"
pool = "openhands"
multiplier = 2

[[routes]]
listen_port = {PORT_ROUTE}
pool = "openhands"

[models."gpt-4o"]
input = 2.5
output = 10.0

[models."claude-sonnet-4-5"]
input = 3.0
output = 15.0

[models."gemini-2.5-flash"]
input = 0.3
output = 2.5

[models."special"]
input = 1.0
output = 1.0
pool = "ohmygpt"
"""


@dataclass
class Env:
    metering: Metering
    tctx: taddons.context
    store: Store
    db_url: str
    config_path: Path


def make_flow(
    path: str = "/v1/chat/completions",
    body: dict[str, Any] | bytes | None = None,
    *,
    key: str | None = KEY,
    key_header: str = "authorization",
    host: str = OPENHANDS_HOST,
    mode: str = "regular",
    listen_port: int = 8080,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> http.HTTPFlow:
    if body is None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [("host", host), ("content-type", "application/json"), *extra_headers]
    if key is not None:
        headers.append((key_header, f"Bearer {key}" if key_header == "authorization" else key))
    headers.append(("content-length", str(len(content))))
    upstream_host = "upstream.test" if mode.startswith("reverse") else host
    req = tutils.treq(
        method=b"POST",
        host=upstream_host,
        port=80,
        path=path.encode(),
        headers=http.Headers([(k.encode(), v.encode()) for k, v in headers]),
        content=content,
        timestamp_start=time.time(),
    )
    client = tflow.tclient_conn()
    client.sockname = ("127.0.0.1", listen_port)
    client.proxy_mode = ProxyMode.parse(mode)
    return tflow.tflow(req=req, client_conn=client, server_conn=connection.Server(address=None))


def json_response(body: dict[str, Any], status: int = 200) -> http.Response:
    return http.Response.make(status, json.dumps(body), {"content-type": "application/json"})


def sse_response(status: int = 200) -> http.Response:
    response = http.Response.make(status, b"", {"content-type": "text/event-stream"})
    response.content = None
    return response


def chat_sse(text: list[str], usage: dict[str, int] | None) -> bytes:
    events: list[dict[str, Any]] = [
        {"model": "gpt-4o", "choices": [{"index": 0, "delta": {"content": t}}]} for t in text
    ]
    if usage is not None:
        events.append({"model": "gpt-4o", "choices": [], "usage": usage})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if usage is not None else b"")


async def admit(env: Env, f: http.HTTPFlow) -> None:
    await env.metering.requestheaders(f)
    await env.metering.request(f)


async def streaming(env: Env) -> tuple[http.HTTPFlow, StreamTap]:
    """An admitted chat completion answered with a stream: the flow, and the tap its body
    runs through."""
    f = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
    await admit(env, f)
    f.response = sse_response()
    env.metering.responseheaders(f)
    tap = env.metering.phases[f].tap
    assert tap is not None
    return f, tap


def settled(env: Env, request_id: str) -> dict[str, Any] | None:
    """Drain the writer, then the request log written for ``request_id``."""
    env.metering.done()
    return env.store.log(request_id)


def alice_store(tmp_path: Path, **balances: Decimal) -> tuple[Path, str, Store]:
    """CONFIG written to ``tmp_path`` and a SQLite store there holding alice (key ``KEY``)
    with ``balances``: (config path, store URL, the open store)."""
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(CONFIG)
    db_url = f"sqlite:///{tmp_path / 'burnmeter.db'}"
    store = open_store(db_url, load_config(config_path).pools)
    store.ensure_schema(0)
    store.create_user("alice", hash_key(KEY), balances)
    return config_path, db_url, store


class FullDisk:
    """``os.write`` answers ENOSPC for the journal's file while ``full``: the OS boundary."""

    def __init__(self, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full = True
        real_write = os.write

        def write(fd: int, data: bytes) -> int:
            if fd == journal._fd and self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
