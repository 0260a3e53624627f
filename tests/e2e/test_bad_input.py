"""Bad input through the real proxy: it answers in the API's shape or meters correctly, keeps
serving, and leaves the store consistent.

Every case runs as its own user and is followed by one normal request from that user (the
proxy still serves). Then: Σ logged creditsCost == the user's balance change, no hold of
the user is left open, and ``reconcile`` finds nothing for the user.

Choices documented here:
- An upstream error that reports usage (a 500 whose body carries ``usage``) is charged
  that usage, logged ``isSuccess: false``: the upstream did consume (and bill) the tokens.
- An upstream's non-JSON error page (HTML 502) is passed through as is, logged free.
- A 200 whose body has no readable usage (truncated, empty, not JSON) is charged the hold
  (``usageSource: estimated``): the upstream answered, so tokens were used, and an API that
  always reports usage and did not must not be billed the visible text only.
- Usage with invalid counts (negative, fractional, strings, booleans, > 1e9, infinite) is
  ignored and the request charged an estimate, never the garbage and never nothing.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from burnmeter.config import Config
from burnmeter.documents import hash_key
from burnmeter.documents import new_key
from burnmeter.reports import reports_for
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from tests.e2e.harness import CONFIG_TOML
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import Account
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import proxy_store
from tests.e2e.harness import wait_logs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

CHAT = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
MESSAGES: list[Any] = [{"role": "user", "content": "Hello there."}]
CHAT_BODY: dict[str, Any] = {"model": "fake-gpt", "messages": MESSAGES}
STREAM_BODY: dict[str, Any] = CHAT_BODY | {"stream": True}
CLAUDE_BODY: dict[str, Any] = {"model": "fake-claude", "max_tokens": 32, "messages": MESSAGES}
START = Decimal(5)
SMALL_LIMIT = 4096


def deep(levels: int) -> bytes:
    content = "[" * levels + "]" * levels
    return (
        f'{{"model": "fake-gpt", "messages": [{{"role": "user", "content": {content}}}]}}'.encode()
    )


@dataclass(frozen=True)
class Case:
    id: str
    body: bytes | dict[str, Any]
    status: int
    charge: str
    """none: answered locally, no log; free: logged at 0; reported / estimated: charged."""
    shape: str | None = None
    """openai / anthropic: a local error in that API's shape; None: the upstream's body."""
    path: str = CHAT
    headers: dict[str, str] = field(default_factory=dict)
    """Why this case fails today, in a file this test's author may not change."""


def usage(**fields: object) -> dict[str, Any]:
    return CHAT_BODY | {"x_usage": fields}


CASES = [
    # -- the request itself is bad: answered locally, never forwarded -------------------
    Case("malformed-json", b'{"model": "fake-gpt", "messages": [', 400, "none", "openai"),
    Case("json-array", b"[1, 2, 3]", 400, "none", "openai"),
    Case("json-string", b'"hello"', 400, "none", "openai"),
    Case("json-null", b"null", 400, "none", "openai"),
    Case("empty-body", b"", 400, "none", "openai"),
    Case("stream-yes", STREAM_BODY | {"stream": "yes"}, 400, "none", "openai"),
    Case("max-tokens-negative", CHAT_BODY | {"max_tokens": -1}, 400, "none", "openai"),
    Case("max-tokens-string", CHAT_BODY | {"max_tokens": "100"}, 400, "none", "openai"),
    Case("max-tokens-bool", CHAT_BODY | {"max_tokens": True}, 400, "none", "openai"),
    Case("messages-string", {"model": "fake-gpt", "messages": "x"}, 400, "none", "openai"),
    Case("messages-of-strings", {"model": "fake-gpt", "messages": ["x"]}, 400, "none", "openai"),
    Case("model-number", {"model": 5, "messages": MESSAGES}, 400, "none", "openai"),
    Case("model-missing", {"messages": MESSAGES}, 400, "none", "openai"),
    Case("model-empty", {"model": "", "messages": MESSAGES}, 400, "none", "openai"),
    Case("stream-options-string", STREAM_BODY | {"stream_options": "x"}, 400, "none", "openai"),
    Case(
        "non-utf8-bytes",
        b'{"model": "fake-gpt", "messages": [{"role": "user", "content": "\xff\xfe\x80"}]}',
        400,
        "none",
        "openai",
    ),
    Case(
        "nested-100000-deep",
        deep(100_000),
        400,
        "none",
        "openai",
    ),
    Case(
        "nested-980-deep",
        deep(980),
        400,
        "none",
        "openai",
    ),
    Case("anthropic-malformed", b"{", 400, "none", "anthropic", MESSAGES_PATH),
    Case(
        "anthropic-messages-object",
        CLAUDE_BODY | {"messages": {"a": 1}},
        400,
        "none",
        "anthropic",
        MESSAGES_PATH,
    ),
    Case(
        "anthropic-no-model",
        {"max_tokens": 5, "messages": MESSAGES},
        400,
        "none",
        "anthropic",
        MESSAGES_PATH,
    ),
    # -- odd but valid requests: forwarded and metered ------------------------------------
    Case("unknown-fields", CHAT_BODY | {"foo": {"bar": [1, None]}, "n_x": None}, 200, "reported"),
    Case(
        "wrong-content-type",
        json.dumps(CHAT_BODY).encode(),
        200,
        "reported",
        headers={"Content-Type": "text/plain"},
    ),
    Case("nested-400-deep", deep(400), 200, "reported"),
    # -- the upstream answers badly ---------------------------------------------------------
    Case("upstream-truncated-json", CHAT_BODY | {"x_raw": "truncated-json"}, 200, "estimated"),
    Case("upstream-html-502", CHAT_BODY | {"x_raw": "html-502"}, 502, "free"),
    Case("upstream-empty-200", CHAT_BODY | {"x_raw": "empty-json"}, 200, "estimated"),
    Case("upstream-text-200", CHAT_BODY | {"x_raw": "text-200"}, 200, "estimated"),
    Case("upstream-gzip-json", CHAT_BODY | {"x_gzip": 1}, 200, "reported"),
    Case("upstream-gzip-sse", STREAM_BODY | {"x_gzip": 1}, 200, "reported"),
    Case(
        "upstream-gzip-sse-1-byte-writes",
        STREAM_BODY | {"x_gzip": 1, "x_split": 1},
        200,
        "reported",
    ),
    Case("upstream-10mb-event", STREAM_BODY | {"x_event_bytes": 10 << 20}, 200, "reported"),
    Case("upstream-sse-no-final-blank", STREAM_BODY | {"x_no_final_blank": 1}, 200, "reported"),
    Case(
        "anthropic-sse-no-final-blank",
        CLAUDE_BODY | {"stream": True, "x_no_final_blank": 1},
        200,
        "reported",
        path=MESSAGES_PATH,
    ),
    Case("usage-negative", usage(prompt_tokens=-5), 200, "estimated"),
    Case("usage-fraction", usage(completion_tokens=2.5), 200, "estimated"),
    Case("usage-integral-float", usage(completion_tokens=3.0), 200, "reported"),
    Case("usage-string", usage(prompt_tokens="12"), 200, "estimated"),
    Case("usage-bool", usage(completion_tokens=True), 200, "estimated"),
    Case("usage-huge", usage(completion_tokens=10**15), 200, "estimated"),
    Case("usage-infinite", usage(prompt_tokens=float("inf")), 200, "estimated"),
    Case("usage-unknown-fields", usage(prompt_tokens_details="?", zzz={"a": [1]}), 200, "reported"),
    Case("usage-null", usage(prompt_tokens=None, completion_tokens=None), 200, "estimated"),
    Case(
        "stream-usage-negative",
        STREAM_BODY | {"x_usage": {"completion_tokens": -1}},
        200,
        "estimated",
    ),
    Case(
        "anthropic-stream-usage-string",
        CLAUDE_BODY | {"stream": True, "x_usage": {"output_tokens": "many"}},
        200,
        "estimated",
        path=MESSAGES_PATH,
    ),
    Case("usage-in-500", CHAT_BODY | {"x_status": 500, "x_error_usage": 1}, 500, "reported"),
    Case(
        "anthropic-usage-in-529",
        CLAUDE_BODY | {"x_status": 529, "x_error_usage": 1},
        529,
        "reported",
        path=MESSAGES_PATH,
    ),
]


# -- helpers ----------------------------------------------------------------------------------
def auth(account: Account, path: str) -> dict[str, str]:
    if path == MESSAGES_PATH:
        return {"x-api-key": account.key, "anthropic-version": "2023-06-01"}
    return {"Authorization": f"Bearer {account.key}"}


def post(
    client: httpx.Client, account: Account, path: str, body: bytes | dict[str, Any], **headers: str
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **auth(account, path), **headers}
    return client.post(path, content=content, headers=sent)


def assert_error_shape(response: httpx.Response, shape: str) -> None:
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if shape == "anthropic":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    else:
        assert {"message", "type", "code"} <= set(body["error"])
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def healthy(client: httpx.Client, account: Account) -> None:
    """The proxy still serves: a normal request from the same user works."""
    r = post(client, account, CHAT, CHAT_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "


def consistent(store: Store, config: Config, account: Account, logs: int) -> list[Document]:
    """``logs`` request logs, costs matching the balance change, no open hold, no mismatch."""
    found = wait_logs(store, account.user_id, logs)
    assert len(found) == logs, [(log["path"], log["statusCode"]) for log in found]
    spent = sum((log["creditsCost"] for log in found), Decimal(0))
    change = sum(
        (START - store.balance(account.user_id, pool) for pool in config.pools.values()),
        Decimal(0),
    )
    assert change == spent, f"balance changed by {change}, logs say {spent}"
    later = datetime.now(UTC) + timedelta(days=1)
    assert [h for h in store.open_holds(later) if h.user_id == account.user_id] == []
    mismatches = reports_for(store).reconcile(Decimal("0.000001"))
    assert [m for m in mismatches if m.user == account.user_id] == []
    return found


def the_case_log(logs: list[Document]) -> Document:
    """The case's own log: the oldest (logs come newest first; the last is the check)."""
    return sorted(logs, key=lambda log: log["createdAt"])[0]


@pytest.fixture(scope="module")
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.base_url, headers={"Host": OPENHANDS_HOST}, timeout=30) as c:
        yield c


BALANCES = {"creditsNew": START, "credits": START, "refCredits": Decimal(0)}


def fresh(accounts: Accounts) -> Account:
    return accounts.new(**BALANCES)


# -- the matrix -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id) for c in CASES],
)
def test_bad_input(
    case: Case,
    proxy: Proxy,
    upstream: Upstream,
    store: Store,
    accounts: Accounts,
    config: Config,
    client: httpx.Client,
) -> None:
    account = fresh(accounts)
    upstream.reset()
    r = post(client, account, case.path, case.body, **case.headers)
    assert r.status_code == case.status, r.text[:300]
    if case.shape is not None:
        assert_error_shape(r, case.shape)
    if case.charge == "none":
        assert upstream.stats()["total"] == 0, "a rejected request reached the upstream"
    healthy(client, account)

    logs = consistent(store, config, account, 1 if case.charge == "none" else 2)
    if case.charge == "none":
        return
    log = the_case_log(logs)
    assert log["statusCode"] == case.status
    assert log["isSuccess"] is (200 <= case.status < 300)
    if case.charge == "free":
        assert log["creditsCost"] == 0 and log["usageSource"] == "none"
    else:
        assert log["creditsCost"] > 0, f"{case.id}: charged nothing"
        assert log["usageSource"] == case.charge
        assert 0 <= log["inputTokens"] < 10**6 and 0 <= log["outputTokens"] < 10**6
    if case.charge == "reported" and case.status == 200:
        assert log["outputTokens"] == 3


# -- request size -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """A second proxy whose max_request_bytes is small (the shared one allows 20 MB)."""
    workdir = tmp_path_factory.mktemp("small")
    config_path = workdir / "burnmeter.toml"
    config_path.write_text(f"max_request_bytes = {SMALL_LIMIT}\n" + CONFIG_TOML)
    config_path.chmod(0o600)
    with Proxy(upstream, config_path, workdir / "burnmeter.db", workdir) as handle:
        yield handle


@pytest.fixture(scope="module")
def small_store(small_proxy: Proxy, config: Config) -> Iterator[Store]:
    with proxy_store(small_proxy, config) as opened:
        yield opened


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_request_over_the_size_limit_is_413(
    small_proxy: Proxy, small_store: Store, upstream: Upstream, config: Config, framing: str
) -> None:
    account = Account(f"e2e-small-{framing}-{os.getpid()}", new_key())
    small_store.create_user(account.user_id, hash_key(account.key), BALANCES)
    body = json.dumps(
        CHAT_BODY | {"messages": [{"role": "user", "content": "x" * SMALL_LIMIT}]}
    ).encode()
    upstream.reset()
    with httpx.Client(
        base_url=small_proxy.base_url, headers={"Host": OPENHANDS_HOST}, timeout=10
    ) as c:
        content: bytes | Iterator[bytes] = body if framing == "content-length" else iter([body])
        r = c.post(CHAT, content=content, headers=auth(account, CHAT))
        # mitmproxy's own 413 (body_size_limit): it stops reading as soon as the limit is
        # passed, where the addon's JSON 413 came only after the whole body was buffered
        assert r.status_code == 413, r.text
        assert upstream.stats()["total"] == 0
        healthy(c, account)
    consistent(small_store, config, account, 1)


# -- HTTP/2 -----------------------------------------------------------------------------------
def test_http2_cleartext_is_refused_cleanly(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config, client: httpx.Client
) -> None:
    """mitmproxy 12 does not accept h2c with prior knowledge ("currently not supported"): the
    connection is closed, nothing is charged, and the proxy keeps serving."""
    account = fresh(accounts)
    with httpx.Client(http1=False, http2=True, base_url=proxy.base_url, timeout=5) as h2:
        with pytest.raises(httpx.TransportError):
            post(h2, account, CHAT, CHAT_BODY, Host=OPENHANDS_HOST)
    healthy(client, account)
    consistent(store, config, account, 1)


def test_tls_client_offering_http2_is_served_and_metered(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config, client: httpx.Client
) -> None:
    """A TLS client offering h2 and http/1.1 to the reverse proxy: mitmproxy answers over
    HTTP/1.1 here (the upstream is plain HTTP/1), metered as usual."""
    account = fresh(accounts)
    base = proxy.base_url.replace("http://", "https://")
    with httpx.Client(http2=True, verify=False, base_url=base, timeout=10) as tls:
        r = post(tls, account, CHAT, CHAT_BODY, Host=OPENHANDS_HOST)
        assert r.status_code == 200 and r.http_version in ("HTTP/1.1", "HTTP/2")
        stream = post(tls, account, CHAT, STREAM_BODY | {"x_split": 3}, Host=OPENHANDS_HOST)
        assert stream.text.count('"tok') == 3
    logs = consistent(store, config, account, 2)
    assert all(log["usageSource"] == "reported" and log["creditsCost"] > 0 for log in logs)


def h2_post(port: int, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, bytes]:
    """One POST over TLS whose ALPN offers only h2 (httpx always offers http/1.1 first, and
    mitmproxy follows the client's preference): (status, body)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # mitmproxy's own certificate
    context.set_alpn_protocols(["h2"])
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    content = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=OPENHANDS_HOST) as sock:
            assert sock.selected_alpn_protocol() == "h2"
            conn.initiate_connection()
            request = {":method": "POST", ":scheme": "https", ":authority": OPENHANDS_HOST}
            request |= {":path": CHAT, "content-type": "application/json", **headers}
            conn.send_headers(1, list(request.items()))
            conn.send_data(1, content, end_stream=True)
            sock.sendall(conn.data_to_send())
            status, data = 0, b""
            while True:
                chunk = sock.recv(65536)
                assert chunk, "connection closed before the end of the stream"
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    elif isinstance(event, h2.events.StreamEnded):
                        return status, data
                sock.sendall(conn.data_to_send())


def test_http2_client_end_to_end(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config, client: httpx.Client
) -> None:
    """A real HTTP/2 client (TLS, ALPN h2): mitmproxy speaks h2 to it and HTTP/1.1 to the
    upstream; the request is metered like any other, JSON and SSE, and errors keep their
    shape."""
    account = fresh(accounts)
    headers = {"authorization": f"Bearer {account.key}"}
    status, data = h2_post(proxy.port, headers, CHAT_BODY)
    assert status == 200, data
    assert json.loads(data)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    status, data = h2_post(proxy.port, headers, STREAM_BODY | {"x_split": 3})
    assert status == 200 and data.count(b'"tok') == 3 and b'"usage": {' in data
    status, data = h2_post(proxy.port, {"authorization": "Bearer nope"}, CHAT_BODY)
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    healthy(client, account)
    logs = consistent(store, config, account, 3)
    assert sorted(log["stream"] for log in logs) == [False, False, True]
    assert all(log["usageSource"] == "reported" and log["creditsCost"] > 0 for log in logs)


# -- client disconnects ---------------------------------------------------------------------------
def raw_request(account: Account, body: dict[str, Any]) -> tuple[bytes, bytes]:
    content = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: {OPENHANDS_HOST}\r\n"
        f"Authorization: Bearer {account.key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(content)}\r\n\r\n"
    ).encode()
    return head, content


def read_until(sock: socket.socket, marker: bytes, limit: float = 10) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while marker not in data:
        assert time.monotonic() < deadline, f"no {marker!r} in {data[-200:]!r}"
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


STAGES = {
    # stage: (request body, what to read before closing, logs expected for the case)
    "before-body": (CHAT_BODY, None, 0),
    "after-request": (CHAT_BODY | {"x_ttft_ms": 400}, b"", None),
    "after-response-headers": (STREAM_BODY | {"x_ttft_ms": 400, "x_chunks": 20}, b"\r\n\r\n", 1),
    "mid-stream": (STREAM_BODY | {"x_chunks": 40, "x_delay_ms": 30}, b'"tok3 ', 1),
    "after-last-byte": (STREAM_BODY, b"data: [DONE]\n\n", 1),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_client_disconnect(
    stage: str,
    proxy: Proxy,
    upstream: Upstream,
    store: Store,
    accounts: Accounts,
    config: Config,
    client: httpx.Client,
) -> None:
    account = fresh(accounts)
    body, read, expected = STAGES[stage]
    head, content = raw_request(account, body)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        if stage == "before-body":
            sock.sendall(head + content[:10])
            time.sleep(0.2)
        else:
            sock.sendall(head + content)
            if read:
                read_until(sock, read)
            else:
                time.sleep(0.15)  # the upstream is still thinking
    if expected is None:
        # Gone before any response byte: mitmproxy reports the flow as failed (or, if the
        # upstream answers first, as a response): either way one log, nothing owed twice.
        time.sleep(0.6)
        expected = 1
    healthy(client, account)
    logs = consistent(store, config, account, expected + 1)
    if stage in ("after-response-headers", "mid-stream", "after-last-byte"):
        log = the_case_log(logs)
        assert log["creditsCost"] > 0, f"{stage}: charged nothing for a started stream"
    if stage == "after-last-byte":
        assert the_case_log(logs)["usageSource"] == "reported"


# -- last: the CLI agrees the whole store is consistent ---------------------------------------
def test_reconcile_cli_is_clean(proxy: Proxy, config_path: Path, store: Store) -> None:
    import subprocess
    import sys

    time.sleep(0.3)  # settlements of the last requests
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stats",
            "--db",
            proxy.db_url,
            "--config",
            str(config_path),
            "reconcile",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [], done.stdout
