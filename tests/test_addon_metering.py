from __future__ import annotations

import asyncio
import gzip
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import hypothesis
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from mitmproxy import connection
from mitmproxy import exceptions
from mitmproxy import flow
from mitmproxy import http
from mitmproxy.addons import proxyserver
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons
from mitmproxy.test import tflow
from mitmproxy.utils.asyncio_utils import create_task

from addons import billing
from addons.metering import Metering
from addons.metering import ready_line
from addons.phases import Admitted
from addons.phases import Quoted
from burnmeter.config import load_config
from burnmeter.documents import hash_key
from burnmeter.documents import utcnow
from burnmeter.exceptions import JournalFull
from burnmeter.exceptions import StoreError
from burnmeter.sse import MAX_EVENT_BYTES
from burnmeter.store import open_store
from tests.addon_support import BOB_KEY
from tests.addon_support import CONFIG
from tests.addon_support import KEY
from tests.addon_support import OHMYGPT_HOST
from tests.addon_support import OPENHANDS_HOST
from tests.addon_support import PORT_ROUTE
from tests.addon_support import Env
from tests.addon_support import FullDisk
from tests.addon_support import admit
from tests.addon_support import chat_sse
from tests.addon_support import json_response
from tests.addon_support import make_flow
from tests.addon_support import settled
from tests.addon_support import sse_response
from tests.addon_support import streaming
from tests.stores import put_key


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A configured ``Metering`` on a real SQLite store with alice (credit) and bob (none)."""
    monkeypatch.delenv("BURNMETER_DB", raising=False)
    config_path = tmp_path / "burnmeter.toml"
    config_path.write_text(CONFIG)
    db_url = f"sqlite:///{tmp_path / 'burnmeter.db'}"
    config = load_config(config_path)
    store = open_store(db_url, config.pools)
    store.ensure_schema(0)
    store.create_user("alice", hash_key(KEY), {"creditsNew": Decimal(5), "credits": Decimal(3)})
    store.create_user("bob", hash_key(BOB_KEY), {"creditsNew": Decimal(0)})
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.configure(m, metering_config=str(config_path), metering_db=db_url)
        yield Env(m, tctx, store, db_url, config_path)
        m.done()
    store.close()


CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}


def body_of(f: http.HTTPFlow) -> dict:
    assert f.response is not None
    return json.loads(f.response.content or b"")


# -- options ---------------------------------------------------------------------------
def test_bad_config_is_one_line_options_error(env: Env) -> None:
    with pytest.raises(exceptions.OptionsError, match="metering_config: .*No such file"):
        env.tctx.configure(env.metering, metering_config=str(env.config_path) + "x")
    env.config_path.write_text('[default_route]\npool = "nope"\nmultiplier = 1\n')
    with pytest.raises(exceptions.OptionsError, match="default_route.pool: no pool named 'nope'"):
        env.tctx.configure(env.metering, metering_key_cache_ttl=5)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"metering_key_cache_ttl": -1}, "metering_key_cache_ttl"),
        ({"metering_journal_max_kb": 1}, "metering_journal_max_kb: must be at least"),
        ({"metering_sweep_seconds": 0}, "metering_sweep_seconds"),
        ({"metering_journal": "/nonexistent/dir/j"}, "metering_journal: .*No such file"),
        ({"metering_db": "postgres://x/y"}, "metering_db: .*unsupported store URL"),
    ],
)
def test_bad_options(env: Env, opts: dict, match: str) -> None:
    with pytest.raises(exceptions.OptionsError, match=match):
        env.tctx.configure(env.metering, **opts)
    assert env.metering.admission is not None, "a rejected change keeps the running store"


async def test_a_forward_proxy_client_cannot_steer_the_upstream_key_elsewhere(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside reverse mode the client picks the destination: the route (and its key) must
    follow the destination, not a Host header, and a listen-port route never sends one."""
    text = env.config_path.read_text().replace(
        "multiplier = 2\n", 'multiplier = 2\nupstream_key_env = "BM_TEST_UPSTREAM"\n', 1
    )
    port_route = f'listen_port = {PORT_ROUTE}\npool = "openhands"\n'
    text = text.replace(port_route, port_route + 'upstream_key_env = "BM_TEST_UPSTREAM"\n')
    env.config_path.write_text(text)
    monkeypatch.setenv("BM_TEST_UPSTREAM", "sk-operator")
    env.tctx.configure(env.metering, metering_key_cache_ttl=1)
    direct = make_flow()  # to the route's own host: its key goes there
    await admit(env, direct)
    assert direct.request.headers["authorization"] == "Bearer sk-operator"
    steered = make_flow()
    steered.request.host = "evil.example"  # the destination; the Host header still says the route's
    await admit(env, steered)
    assert "authorization" not in steered.request.headers
    assert env.metering.phases[steered].pool == "ohmygpt", "billed by destination: no route"
    by_port = make_flow(host="evil.example", listen_port=PORT_ROUTE)
    await admit(env, by_port)
    assert env.metering.phases[by_port].pool == "openhands"
    assert "authorization" not in by_port.request.headers


def test_reverse_mode_over_tls_presents_the_upstreams_name(env: Env) -> None:
    """keep_host_header (which the addon sets) would make mitmproxy reuse the client's SNI."""
    client = tflow.tclient_conn()
    client.proxy_mode = ProxyMode.parse("reverse:https://api.example.com:8443")
    server = connection.Server(address=("api.example.com", 8443), sni="chat.trollllm.xyz")
    env.metering.server_connect(server_hooks.ServerConnectionHookData(server, client))
    assert server.sni == "api.example.com"
    plain = connection.Server(address=("api.example.com", 80), sni=None)
    client.proxy_mode = ProxyMode.parse("regular")
    env.metering.server_connect(server_hooks.ServerConnectionHookData(plain, client))
    assert plain.sni is None


def test_upstream_key_env_must_be_set(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    text = env.config_path.read_text().replace(
        "multiplier = 2\n", 'multiplier = 2\nupstream_key_env = "BM_TEST_UPSTREAM"\n', 1
    )
    env.config_path.write_text(text)
    monkeypatch.delenv("BM_TEST_UPSTREAM", raising=False)
    with pytest.raises(exceptions.OptionsError, match=r"\$BM_TEST_UPSTREAM is not set"):
        env.tctx.configure(env.metering, metering_key_cache_ttl=1)


async def test_upstream_key_replaces_the_client_key(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = env.config_path.read_text().replace(
        "multiplier = 2\n", 'multiplier = 2\nupstream_key_env = "BM_TEST_UPSTREAM"\n', 1
    )
    env.config_path.write_text(text)
    monkeypatch.setenv("BM_TEST_UPSTREAM", "sk-upstream")
    env.tctx.configure(env.metering, metering_key_cache_ttl=1)
    f = make_flow()
    await admit(env, f)
    assert f.response is None
    assert f.request.headers["authorization"] == "Bearer sk-upstream"
    other = make_flow(host=OHMYGPT_HOST)
    await admit(env, other)
    assert "authorization" not in other.request.headers, "a client key is never forwarded"


def test_proxy_options_are_in_force_before_mitmproxy_listens(env: Env) -> None:
    """mitmproxy starts listening before scripts' ``running``: the options the routing
    needs are set when the addon loads, and cannot be turned off while it runs."""
    m = Metering()
    with taddons.context(proxyserver.Proxyserver(), m) as tctx:
        assert tctx.options.connection_strategy == "lazy"  # no `running` yet
        assert tctx.options.keep_host_header is True
        with pytest.raises(exceptions.OptionsError, match="keep_host_header: metering needs"):
            tctx.options.update(keep_host_header=False)
        assert tctx.options.keep_host_header is True
        with pytest.raises(exceptions.OptionsError, match="connection_strategy: metering"):
            tctx.options.update(connection_strategy="eager")
        m.done()


def test_running_says_it_is_ready(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    m = Metering()
    with taddons.context(proxyserver.Proxyserver(), m) as tctx:
        tctx.configure(
            m,
            metering_config=str(env.config_path),
            metering_db=env.db_url,
            metering_journal=str(env.config_path.with_name("second.journal")),
        )
        with caplog.at_level(logging.INFO):
            m.running()
        assert tctx.options.connection_strategy == "lazy"
        assert tctx.options.keep_host_header is True
        # no server runs here: the addon does not claim to be ready
        assert "metering: not ready: the proxy listens on no address" in caplog.text
        assert "metering: ready" not in caplog.text
        assert m.settings is not None
        ready = ready_line(m.settings, ["127.0.0.1:8004", "[::1]:8004"])
        assert ready == (
            f"config {env.config_path}, store {env.db_url}, journal "
            f"{env.config_path.with_name('second.journal')}, listening on 127.0.0.1:8004, [::1]:8004"
        )
        m.done()


def test_an_unknown_metering_option_at_start_names_the_closest(env: Env) -> None:
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.options.set("metering_jornal=x.journal", defer=True)  # a typo: never applied
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(m, metering_config=str(env.config_path), metering_db=env.db_url)
        assert str(e.value) == "metering_jornal: no such option (did you mean metering_journal?)"
        assert m.admission is None


def test_a_start_up_error_ends_the_process_with_one_line(env: Env) -> None:
    m = Metering(exit_on_startup_error=True)
    with taddons.context(proxyserver.Proxyserver(), m) as tctx:
        with pytest.raises(SystemExit) as e:
            tctx.configure(m, metering_config=str(env.config_path) + "x")
        assert str(e.value).endswith(
            ": metering_config: " + str(env.config_path) + "x: No such file or directory"
        )
        journal = str(env.config_path.with_name("third.journal"))
        tctx.configure(
            m,
            metering_config=str(env.config_path),
            metering_db=env.db_url,
            metering_journal=journal,
        )
        m.running()
        with pytest.raises(exceptions.OptionsError):  # once running: refused, proxy goes on
            tctx.configure(m, metering_config=str(env.config_path) + "x")
        assert m.admission is not None
        m.done()


def test_config_is_found_as_the_cli_finds_it(
    env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BURNMETER_CONFIG", str(env.config_path))
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.configure(m, metering_db=env.db_url, metering_journal=str(tmp_path / "j"))
        assert m.settings is not None
        assert m.settings.config_source.describe() == f"{env.config_path} ($BURNMETER_CONFIG)"
        monkeypatch.delenv("BURNMETER_CONFIG")
        (tmp_path / "burnmeter.toml").write_text('timezone = "UTC"\n')
        tctx.configure(m, metering_key_cache_ttl=1)
        assert m.settings.config_source.describe() == "burnmeter.toml (working directory)"
        assert m.settings.config.timezone == "UTC"
        m.done()


@pytest.mark.parametrize(
    "modes, host, port, journal",
    [
        (["regular"], "", None, "DB.8080.journal"),
        (["reverse:https://api.openai.com@8004"], "127.0.0.1", None, "DB.127.0.0.1-8004.journal"),
        (["reverse:http://a@8004", "reverse:http://b@8005"], "", 9, "DB.8004+8005.journal"),
        (["regular"], "::1", 8181, "DB.__1-8181.journal"),
    ],
)
def test_default_journal_is_named_after_the_store_and_listen_addresses(
    env: Env, modes: list[str], host: str, port: int | None, journal: str
) -> None:
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.options.update(mode=modes, listen_host=host, listen_port=port)
        tctx.configure(m, metering_config=str(env.config_path), metering_db=env.db_url + "2")
        assert m.settings is not None
        db = env.db_url.removeprefix("sqlite:///") + "2"
        assert m.settings.journal_path == journal.replace("DB", db)
        m.done()


def test_default_store_comes_from_env(env: Env, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("BURNMETER_DB", f"sqlite:///{tmp_path / 'other.db'}")
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.configure(m, metering_config=str(env.config_path))
        assert m.settings is not None and m.settings.db_url.endswith("other.db")
        assert m.settings.key_cache_ttl == 30
        m.done()


# -- authentication --------------------------------------------------------------------
async def test_missing_and_unknown_keys_are_401_in_openai_shape(env: Env) -> None:
    for key in (None, "sk-nobody-000000000000"):
        f = make_flow(key=key)
        await admit(env, f)
        assert f.response is not None and f.response.status_code == 401
        error = body_of(f)["error"]
        assert {"message", "type", "code"} <= set(error)
        assert f.metadata["metering"]["outcome"] == "rejected"
        assert f.marked == ":no_entry:"


async def test_anthropic_path_uses_anthropic_shape_and_x_api_key(env: Env) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}
    f = make_flow("/v1/messages", body, key="sk-wrong-00000000000000", key_header="x-api-key")
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 401
    assert body_of(f) == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Invalid API key"},
    }
    ok = make_flow("/v1/messages", body, key_header="x-api-key")
    await admit(env, ok)
    assert ok.response is None
    assert "x-api-key" not in ok.request.headers


async def test_gemini_key_in_query_and_gemini_error_shape(env: Env) -> None:
    path = "/v1beta/models/gemini-2.5-flash:generateContent"
    body = {"contents": [{"parts": [{"text": "hi"}]}]}
    f = make_flow(f"{path}?key={KEY}", body, key=None)
    await admit(env, f)
    assert f.response is None
    assert "key" not in f.request.query
    assert f.metadata == {} and env.metering.phases[f].model == "gemini-2.5-flash"
    bad = make_flow(path, body, key=None)
    await admit(env, bad)
    assert body_of(bad)["error"]["status"] == "UNAUTHENTICATED"


async def test_revoked_key_stops_within_the_cache_ttl(env: Env) -> None:
    await admit(env, make_flow())
    env.store.set_fields("alice", {"isActive": False})
    cached = make_flow()
    await admit(env, cached)
    assert cached.response is None, "still cached"
    assert env.metering.admission is not None
    cache = env.metering.admission.cache
    later = cache.clock() + cache.ttl + 1
    cache.clock = lambda: later  # the TTL has passed
    f = make_flow()
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 401
    assert body_of(f)["error"]["message"] == "API key has been revoked"


async def test_store_down_fails_closed_with_503(env: Env, monkeypatch) -> None:
    assert env.metering.store is not None

    def down(key: str) -> None:
        raise StoreError("connection refused")

    monkeypatch.setattr(env.metering.store, "find_key", down)
    f = make_flow()
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 503
    assert body_of(f)["error"]["code"] == "metering_unavailable"


# -- admission -------------------------------------------------------------------------
@pytest.mark.parametrize("hook", ["authenticate", "admit"])
async def test_an_unexpected_admission_error_fails_closed(
    env: Env, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    """mitmproxy logs a hook's exception and goes on: the request must not go out unmetered."""
    assert env.metering.admission is not None

    async def broken(*args: object) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(env.metering.admission, hook, broken)
    f = make_flow()
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 503
    assert body_of(f)["error"]["code"] == "metering_unavailable"
    assert "authorization" not in f.request.headers
    assert f not in env.metering.phases


async def test_insufficient_credits_is_402_with_balance(env: Env) -> None:
    f = make_flow(key=BOB_KEY)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 402
    error = body_of(f)["error"]
    assert error["code"] == "insufficient_credits" and error["balance"] == 0
    assert "Current balance: $0.00" in error["message"]
    assert f.comment == "bob · rejected: insufficient_credits"

    anthropic = make_flow(
        "/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}, key=BOB_KEY
    )
    await admit(env, anthropic)
    assert body_of(anthropic)["error"]["type"] == "insufficient_credits"


async def test_expired_pool_is_402_credits_expired(env: Env) -> None:
    env.store.set_fields("alice", {"expiresAtNew": utcnow() - timedelta(days=1)})
    f = make_flow()
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 402
    assert body_of(f)["error"]["code"] == "credits_expired"
    other_pool = make_flow(host=OHMYGPT_HOST)
    await admit(env, other_pool)
    assert other_pool.response is None, "only the expired pool is refused"


async def test_an_expired_key_is_402_credits_expired(env: Env) -> None:
    """An original key document's expiry is its package's: the original answered 402
    (docs/documents.md, user_keys.expiresAt)."""
    env.store.import_user({"_id": "minh", "credits": 5.0, "isActive": True})
    put_key(
        env.store,
        {"_id": "sk-minh-legacy-0123456789", "name": "minh", "expiresAt": utcnow() - timedelta(1)},
    )
    f = make_flow(key="sk-minh-legacy-0123456789", host=OHMYGPT_HOST)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 402
    assert body_of(f)["error"]["code"] == "credits_expired"


async def test_oversized_body_is_413(env: Env) -> None:
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
    f = make_flow(body=big)
    await env.metering.requestheaders(f)
    assert f.response is not None and f.response.status_code == 413
    chunked = make_flow(body=big)
    del chunked.request.headers["content-length"]
    await admit(env, chunked)
    assert chunked.response is not None and chunked.response.status_code == 413


@pytest.mark.parametrize(
    "body, message",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        ({"model": "gpt-4o", "messages": "hi"}, "'messages' must be an array"),
        ({"messages": []}, "'model' is required"),
        ({"model": "gpt-4o", "messages": [], "stream": True, "stream_options": 1}, "stream_opt"),
    ],
)
async def test_bad_bodies_are_400(env: Env, body, message: str) -> None:
    f = make_flow(body=body)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 400
    assert message in body_of(f)["error"]["message"]
    assert env.store.balance("alice", env.store.pools["openhands"]) == 5, "nothing held"


async def test_unknown_model_is_400_under_reject_policy(env: Env) -> None:
    f = make_flow(body={"model": "gpt-9", "messages": []})
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 400
    assert body_of(f)["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/ft:gpt-4o:acme::abc123"),
        ("GET", "/v1beta/models/gemini-2.5-flash"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/v1beta/models/gemini-2.5-flash:countTokens"),
    ],
)
async def test_free_paths_pass_through_with_auth_and_no_charge(
    env: Env, method: str, path: str
) -> None:
    f = make_flow(path, b"")
    f.request.method = method
    await admit(env, f)
    assert f.response is None
    assert f.metadata["metering"]["outcome"] == "passthrough"
    assert "authorization" not in f.request.headers
    assert f not in env.metering.phases


@pytest.mark.parametrize(
    "method, path, shape",
    [
        ("POST", "/v1/completions", "openai"),  # legacy completions: not metered, not free
        ("POST", "/v1/batches", "openai"),
        ("GET", "/v1/responses/resp_123", "openai"),  # a stored response's output
        ("POST", "/v1/messages/batches", "anthropic"),
        ("POST", "/v1beta/models/gemini-2.5-flash:batchGenerateContent", "gemini"),
        ("POST", "/v1/models", "openai"),
    ],
)
async def test_other_paths_are_404_and_never_forwarded(
    env: Env, method: str, path: str, shape: str
) -> None:
    f = make_flow(path, {"model": "gpt-4o", "prompt": "hi"})
    f.request.method = method
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 404
    body = body_of(f)
    if shape == "anthropic":
        assert body["error"]["type"] == "not_found_error"
    elif shape == "gemini":
        assert body["error"]["status"] == "NOT_FOUND"
    else:
        assert body["error"]["code"] == "unsupported_endpoint"
    assert path.split("?")[0] in body["error"]["message"]
    assert "authorization" not in f.request.headers
    unknown = make_flow(path, b"", key="sk-nobody")  # authentication still comes first
    unknown.request.method = method
    await admit(env, unknown)
    assert unknown.response is not None and unknown.response.status_code == 401


async def test_a_compressed_request_body_is_415_not_inflated(env: Env) -> None:
    """A 2 KB gzip body can inflate to 2 MB (or gigabytes): it is refused before decoding."""
    body = json.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 2_000_000}]}
    )
    packed = gzip.compress(body.encode())
    assert len(packed) < 4096 < len(body), "under max_request_bytes only while compressed"
    f = make_flow(body=packed, extra_headers=(("content-encoding", "gzip"),))
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 415
    assert body_of(f)["error"]["code"] == "unsupported_content_encoding"
    assert openhands_balance(env) == 5, "nothing held"


async def test_background_responses_are_refused(env: Env) -> None:
    body = {"model": "gpt-4o", "input": "hi", "background": True}
    f = make_flow("/v1/responses", body)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 400
    assert "Background responses" in body_of(f)["error"]["message"]
    assert openhands_balance(env) == 5, "nothing held"


# -- routing ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, body_model, pool",
    [
        ({"host": OPENHANDS_HOST}, "gpt-4o", "openhands"),
        (
            {"host": f"{OPENHANDS_HOST}:8443", "mode": "reverse:http://upstream.test:80"},
            "gpt-4o",
            "openhands",
        ),
        ({"host": OHMYGPT_HOST}, "gpt-4o", "ohmygpt"),  # no route: the default pool
        ({"host": "other.test", "listen_port": PORT_ROUTE}, "gpt-4o", "openhands"),
        ({"host": OPENHANDS_HOST}, "special", "ohmygpt"),  # the model's pool wins
        (
            {"host": OPENHANDS_HOST, "mode": "reverse:http://upstream.test:80"},
            "gpt-4o",
            "openhands",
        ),
    ],
)
async def test_pool_by_host_port_and_model(env: Env, kwargs, body_model: str, pool: str) -> None:
    f = make_flow(body={"model": body_model, "messages": []}, **kwargs)
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.pool == pool and admitted.hold is not None and admitted.hold.pool == pool


async def test_reverse_mode_captures_client_host_then_sets_upstream_host(env: Env) -> None:
    f = make_flow(host=OPENHANDS_HOST, mode="reverse:http://upstream.test:80")
    await admit(env, f)
    assert env.metering.phases[f].host == OPENHANDS_HOST
    assert f.request.host_header == "upstream.test"
    regular = make_flow(host=OPENHANDS_HOST)
    await admit(env, regular)
    assert regular.request.host_header == OPENHANDS_HOST


async def test_an_http2_body_without_content_length_gets_one(env: Env) -> None:
    """An HTTP/1 upstream needs it to find the end of the body (mitmproxy does not add it)."""
    f = make_flow()
    f.request.http_version = "HTTP/2.0"
    del f.request.headers["content-length"]
    await admit(env, f)
    assert f.response is None
    assert f.request.headers["content-length"] == str(len(f.request.raw_content or b""))
    chunked = make_flow(extra_headers=(("transfer-encoding", "chunked"),))
    del chunked.request.headers["content-length"]
    await admit(env, chunked)
    assert "content-length" not in chunked.request.headers


# -- streams ---------------------------------------------------------------------------
async def test_stream_request_gets_include_usage_and_identity_encoding(env: Env) -> None:
    body = {"model": "gpt-4o", "messages": [], "stream": True}
    f = make_flow(body=body, extra_headers=(("accept-encoding", "gzip, br"),))
    await admit(env, f)
    sent = json.loads(f.request.content or b"")
    assert sent["stream_options"] == {"include_usage": True}
    assert f.request.headers["content-length"] == str(len(f.request.raw_content or b""))
    assert f.request.headers["accept-encoding"] == "identity"


async def test_include_usage_already_set_leaves_the_body_alone(env: Env) -> None:
    raw = (
        b'{"model":"gpt-4o","messages":[],"max_completion_tokens":100,"stream":true,'
        b'"stream_options":{"include_usage":true}}'
    )
    f = make_flow(body=raw)
    await admit(env, f)
    assert f.request.raw_content == raw


async def test_streamed_response_is_tapped_and_charged(env: Env) -> None:
    f = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
    await admit(env, f)
    f.response = sse_response()
    env.metering.responseheaders(f)
    tap = env.metering.phases[f].tap
    assert tap is not None and f.response.stream is tap
    body = chat_sse(["Hel", "lo"], CHAT_USAGE)
    out = b"".join(tap(body[i : i + 7]) for i in range(0, len(body), 7)) + tap(b"")
    assert out == body
    env.metering.response(f)
    record = f.metadata["metering"]
    assert (record["input_tokens"], record["output_tokens"]) == (1000, 200)
    # (1000 * 2.5 + 200 * 10) / 1e6 * multiplier 2
    assert record["cost"] == "0.009000000"
    assert record["usage_source"] == "reported" and record["stream"] is True
    log = settled(env, f.id)
    assert log is not None
    assert log["ttftMs"] is not None and log["stream"] is True


async def test_json_response_is_charged_and_annotated(env: Env) -> None:
    f = make_flow()
    await admit(env, f)
    f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    env.metering.responseheaders(f)
    assert not f.response.stream
    env.metering.response(f)
    record = f.metadata["metering"]
    assert f.comment == "alice · gpt-4o · 1,200 tok · $0.00900 · openhands"
    assert record["key"] != KEY and KEY not in json.dumps(record) and KEY not in f.comment
    assert record["billing_tokens"] == 2400
    assert not f.marked
    log = settled(env, f.id)
    assert log is not None
    assert log["creditType"] == "openhands" and log["creditsCost"] == Decimal("0.009")
    assert log["userKeyId"] == record["key"] and KEY not in json.dumps(log, default=str)
    assert log["host"] == OPENHANDS_HOST and log["path"] == "/v1/chat/completions"
    assert log["usageSource"] == "reported" and log["isSuccess"] is True
    assert env.store.balance("alice", env.store.pools["openhands"]) == Decimal("4.991")


async def test_the_careful_input_estimate_is_made_only_for_a_settlement_without_usage(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pay for what you use: admission holds on the bound; the walk of the request that
    estimates its input runs only when the upstream reported no usage (a stream cut short)."""
    asked: list[str] = []
    careful = billing.estimate_input_tokens

    def counted(api: str, body: dict[str, object]) -> int:
        asked.append(api)
        return careful(api, body)

    monkeypatch.setattr(billing, "estimate_input_tokens", counted)
    reported = make_flow()
    await admit(env, reported)
    reported.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    env.metering.responseheaders(reported)
    env.metering.response(reported)
    streamed = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
    await admit(env, streamed)
    streamed.response = sse_response()
    env.metering.responseheaders(streamed)
    tap = env.metering.phases[streamed].tap
    assert tap is not None
    tap(chat_sse(["Hel", "lo"], CHAT_USAGE))
    tap(b"")
    env.metering.response(streamed)
    assert asked == []
    cut = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
    await admit(env, cut)
    cut.response = sse_response()
    env.metering.responseheaders(cut)
    tap = env.metering.phases[cut].tap
    assert tap is not None
    tap(chat_sse(["Hel", "lo"], None).partition(b"data: [DONE]")[0])
    cut.error = flow.Error("peer closed connection")
    env.metering.error(cut)
    assert asked == ["openai.chat"]
    sources = {f.id: f.metadata["metering"]["usage_source"] for f in (reported, streamed, cut)}
    assert sources == {reported.id: "reported", streamed.id: "reported", cut.id: "estimated"}


async def test_upstream_error_without_usage_releases_the_hold(env: Env) -> None:
    f = make_flow()
    await admit(env, f)
    assert env.store.balance("alice", env.store.pools["openhands"]) < 5, "held"
    f.response = json_response({"error": {"message": "boom"}}, status=500)
    env.metering.responseheaders(f)
    env.metering.response(f)
    assert f.marked == ":x:"
    assert f.metadata["metering"]["outcome"] == "failed"
    log = settled(env, f.id)
    assert log is not None and log["creditsCost"] == 0 and log["isSuccess"] is False
    assert log["statusCode"] == 500 and log["usageSource"] == "none"
    assert env.store.balance("alice", env.store.pools["openhands"]) == 5


async def test_upstream_unreachable_releases_the_hold(env: Env) -> None:
    f = make_flow()
    await admit(env, f)
    f.error = flow.Error("[Errno 111] Connect call failed")
    env.metering.error(f)
    log = settled(env, f.id)
    assert log is not None and log["creditsCost"] == 0 and log["statusCode"] == 502
    assert env.store.balance("alice", env.store.pools["openhands"]) == 5


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_error_cut_short_is_free_and_logged_with_its_status(
    env: Env, stream: bool
) -> None:
    """docs/guarantees.md: an upstream error without usage releases the hold and costs 0, also when its
    body never arrived whole (the connection dropped, or the client left)."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi" * 500}]}
    f = make_flow(body=body | {"stream": stream})
    await admit(env, f)
    if stream:
        f.response = sse_response(status=429)
        env.metering.responseheaders(f)
        assert callable(f.response.stream)
        f.response.stream(b'data: {"error": {"message": "slow down", "type": "rate_limit"}}\n\n')
    else:
        f.response = json_response({}, status=500)
        f.response.content = None  # the headers came, the body never completed
        env.metering.responseheaders(f)
    f.error = flow.Error("Client disconnected." if stream else "Server disconnected.")
    env.metering.error(f)
    log = settled(env, f.id)
    assert log is not None and log["creditsCost"] == 0 and log["usageSource"] == "none"
    assert log["statusCode"] == (429 if stream else 500) and log["isSuccess"] is False
    assert openhands_balance(env) == 5


async def test_a_client_gone_before_the_answer_is_logged_499(env: Env) -> None:
    f = make_flow()
    await admit(env, f)
    f.error = flow.Error("Client disconnected.")
    env.metering.error(f)
    h2 = make_flow()  # an HTTP/2 client's connection closing says only "peer closed"
    await admit(env, h2)
    h2.client_conn.state = ConnectionState.CAN_WRITE
    h2.error = flow.Error("peer closed connection")
    env.metering.error(h2)
    upstream = make_flow()  # the same words about the upstream's connection
    await admit(env, upstream)
    upstream.error = flow.Error("peer closed connection")
    env.metering.error(upstream)
    env.metering.done()  # drain the writer
    statuses = [env.store.log(x.id)["statusCode"] for x in (f, h2, upstream)]  # type: ignore[index]
    assert statuses == [499, 499, 502]


@pytest.mark.parametrize("text", ["x" * 400, "x" * 4000])
async def test_client_gone_mid_stream_is_charged_its_hold_or_the_dearer_estimate(
    env: Env, text: str
) -> None:
    """mitmproxy closes the upstream connection when the client leaves: the usage the
    upstream would have reported (hidden reasoning included) is never read."""
    f = make_flow(body={"model": "gpt-4o", "max_tokens": 500, "messages": [], "stream": True})
    await admit(env, f)
    f.server_conn.timestamp_tcp_setup = time.time()  # the request went upstream
    f.response = sse_response()
    env.metering.responseheaders(f)
    assert callable(f.response.stream)
    f.response.stream(chat_sse([text], None))  # text, no usage yet
    f.error = flow.Error("Client disconnected.")
    env.metering.error(f)
    record = f.metadata["metering"]
    assert record["usage_source"] == "estimated"
    assert record["output_tokens"] == max(500, len(text) // 4)
    assert f.marked == ":warning:"
    log = settled(env, f.id)
    assert log is not None
    assert log["statusCode"] == 499 and log["isSuccess"] is False
    assert log["usageSource"] == "estimated" and log["creditsCost"] > 0


async def test_client_gone_before_the_answer_is_charged_its_hold_once_it_went_upstream(
    env: Env,
) -> None:
    f = make_flow(body={"model": "gpt-4o", "max_tokens": 500, "messages": []})
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.hold is not None
    held = admitted.hold.amount
    f.server_conn.timestamp_tcp_setup = time.time()
    f.error = flow.Error("Client disconnected.")
    env.metering.error(f)
    log = settled(env, f.id)
    assert log is not None and log["statusCode"] == 499
    assert log["creditsCost"] == held and log["outputTokens"] == 500


async def test_stream_cut_by_the_upstream_after_partial_usage_raises_output_to_the_text(
    env: Env,
) -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 500, "messages": [], "stream": True}
    f = make_flow("/v1/messages", body, key_header="x-api-key")
    await admit(env, f)
    f.response = sse_response()
    env.metering.responseheaders(f)
    tap = f.response.stream
    assert callable(tap)
    start = {"type": "message_start", "message": {"model": "claude-sonnet-4-5",
             "usage": {"input_tokens": 50, "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta",
             "text": "y" * 80}}  # fmt: skip
    for event in (start, delta):
        tap(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
    f.server_conn.timestamp_tcp_setup = time.time()
    f.error = flow.Error("Server disconnected.")
    env.metering.error(f)
    record = f.metadata["metering"]
    assert (record["input_tokens"], record["output_tokens"]) == (50, 20)
    assert record["usage_source"] == "estimated"


async def test_locally_answered_flows_are_skipped_later(env: Env) -> None:
    f = make_flow(key=None)
    await env.tctx.cycle(env.metering, f)
    assert f.response is not None and f.response.status_code == 401
    assert f.metadata["metering"]["outcome"] == "rejected"
    assert settled(env, f.id) is None


# -- store outage, journal limit, rate limit --------------------------------------------
def store_down(monkeypatch: pytest.MonkeyPatch, env: Env, *methods: str) -> None:
    assert env.metering.store is not None

    def down(*args: object) -> None:
        raise StoreError("connection refused")

    for name in methods:
        monkeypatch.setattr(env.metering.store, name, down)


def openhands_balance(env: Env, user: str = "alice") -> Decimal:
    return env.store.balance(user, env.store.pools["openhands"])


async def test_cached_key_is_served_without_a_hold_while_the_store_is_down(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await admit(env, make_flow())  # alice's key is now cached
    store_down(monkeypatch, env, "try_hold", "hold_many", "find_key")
    f = make_flow()
    await admit(env, f)
    assert f.response is None, "served"
    admitted = env.metering.phases[f]
    assert isinstance(admitted, Admitted) and admitted.hold is None
    f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    env.metering.responseheaders(f)
    env.metering.response(f)
    assert f.metadata["metering"]["holdless"] is True
    log = settled(env, f.id)  # the writer has its own store: it is up
    assert log is not None and log["creditsCost"] == Decimal("0.009")
    assert openhands_balance(env) < Decimal("4.991"), "the first request still holds"


async def test_unknown_key_is_503_while_the_store_is_down(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await admit(env, make_flow())
    store_down(monkeypatch, env, "try_hold", "hold_many")
    await admit(env, make_flow())  # the failed hold marks the store down
    assert env.metering.outage is not None and env.metering.outage.store_down
    looked_up: list[str] = []
    monkeypatch.setattr(env.metering.store, "find_key", looked_up.append)
    f = make_flow(key=BOB_KEY)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 503
    assert body_of(f)["error"]["code"] == "metering_unavailable"
    assert looked_up == [], "no store call while it is marked down"


async def test_a_key_looked_up_during_the_outage_is_not_admitted_without_a_hold(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_down(
        monkeypatch, env, "try_hold", "hold_many"
    )  # reads work, writes fail (a locked SQLite file)
    f = make_flow()
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 503


async def test_cached_balance_must_cover_a_holdless_admission(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await admit(env, make_flow(key=BOB_KEY))  # 402, and bob's key is cached
    store_down(monkeypatch, env, "try_hold", "hold_many")
    f = make_flow(key=BOB_KEY)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 402


async def test_a_slow_store_is_not_waited_for_and_a_late_hold_is_released(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert env.metering.store is not None
    monkeypatch.setattr("addons.admission.STORE_TIMEOUT", 0.05)
    hold_many = env.metering.store.hold_many
    made = threading.Event()

    def slow_holds(*args: object) -> object:
        time.sleep(0.3)
        result = hold_many(*args)  # type: ignore[arg-type]
        made.set()
        return result

    await admit(env, make_flow())
    monkeypatch.setattr(env.metering.store, "hold_many", slow_holds)
    monkeypatch.setattr(env.metering.store, "try_hold", lambda request: None)  # it would wait
    f = make_flow()
    started = time.monotonic()
    await admit(env, f)
    assert time.monotonic() - started < 0.25
    assert f.response is None and env.metering.phases[f].hold is None
    assert await asyncio.to_thread(made.wait, 5)
    for _ in range(200):  # the late hold goes back to the pool
        holds = env.store.open_holds(utcnow() + timedelta(days=1))
        if len(holds) == 1:
            break
        await asyncio.sleep(0.01)
    assert [h.request_id for h in holds] != [f.id] and len(holds) == 1
    assert openhands_balance(env) == 5 - holds[0].amount


async def test_journal_headroom_refuses_new_requests(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.tctx.configure(env.metering, metering_journal_max_kb=8)
    assert env.metering.outage is not None
    f = make_flow()
    await admit(env, f)
    assert f.response is None, "8 KiB: room for two in flight"
    monkeypatch.setattr(env.metering.outage, "in_flight", {f, make_flow()})
    g = make_flow(path="/v1/messages", body={"model": "claude-sonnet-4-5", "messages": []})
    await admit(env, g)
    assert g.response is not None and g.response.status_code == 503
    assert body_of(g)["type"] == "error" and body_of(g)["error"]["type"] == "api_error"


async def test_a_journal_refusal_is_logged_not_dropped(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    f = make_flow()
    await admit(env, f)
    assert env.metering.writer is not None

    def full(settlement: object) -> None:
        raise JournalFull("journal is full")

    monkeypatch.setattr(env.metering.writer, "submit", full)
    f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    with caplog.at_level(logging.ERROR):
        env.metering.response(f)
    assert env.metering.unjournaled == 1
    assert "settlement not journaled" in caplog.text and f.id in caplog.text
    assert '"cost":"0.009000000"' in caplog.text and KEY not in caplog.text


async def test_second_process_on_one_journal_is_one_line_options_error(
    env: Env, tmp_path: Path
) -> None:
    m = Metering()
    with taddons.context(m) as tctx:
        # a valid set-up first: a refused option rolls back to it (not to ./burnmeter.db)
        tctx.configure(
            m,
            metering_config=str(env.config_path),
            metering_db=f"sqlite:///{tmp_path / 'other.db'}",
        )
        with pytest.raises(exceptions.OptionsError, match="^metering_journal: .*in use"):
            tctx.configure(m, metering_db=env.db_url)
        m.done()


async def test_journal_left_by_a_crash_is_replayed_on_start(env: Env) -> None:
    f = make_flow()
    await admit(env, f)
    f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    assert env.metering.writer is not None and env.metering.settings is not None
    path = env.metering.settings.journal_path
    env.metering.writer.stop(0)  # as if killed: nothing applied...
    env.metering.response(f)  # ...but the settlement is journaled
    assert env.store.log(f.id) is None
    env.metering._close()
    m = Metering()
    with taddons.context(m) as tctx:
        tctx.configure(m, metering_config=str(env.config_path), metering_db=env.db_url)
        m.done()
    assert env.store.log(f.id) is not None
    assert Path(path).stat().st_size == 0, "applied, then compacted"


@pytest.mark.parametrize(
    "path, body, shape",
    [
        ("/v1/chat/completions", None, "openai"),
        ("/v1/messages", {"model": "claude-sonnet-4-5", "messages": []}, "anthropic"),
    ],
)
async def test_rate_limit_is_429_with_retry_after(
    env: Env, path: str, body: dict | None, shape: str
) -> None:
    env.config_path.write_text("rate_limit_rpm = 2\n" + CONFIG)
    env.tctx.configure(env.metering, metering_key_cache_ttl=29)
    for _ in range(2):
        ok = make_flow(path, body)
        await admit(env, ok)
        assert ok.response is None
    f = make_flow(path, body)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 429
    assert f.response.headers["Retry-After"] == "30"  # 2/min: one back every 30 s
    error = body_of(f)
    if shape == "openai":
        assert error["error"]["type"] == "requests"
        assert error["error"]["code"] == "rate_limit_exceeded"
    else:
        assert error == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": error["error"]["message"]},
        }
    other = make_flow(path, body, key=BOB_KEY)
    await admit(env, other)
    assert other.response is None or other.response.status_code != 429, "per key"


async def test_a_route_overrides_the_rate_limit_with_its_own_budget(env: Env) -> None:
    text = "rate_limit_rpm = 100\n" + CONFIG.replace(
        "multiplier = 2\n", "multiplier = 2\nrate_limit_rpm = 1\n", 1
    )
    env.config_path.write_text(text)
    env.tctx.configure(env.metering, metering_key_cache_ttl=29)
    first, second = make_flow(), make_flow()
    await admit(env, first)
    await admit(env, second)
    assert first.response is None
    assert second.response is not None and second.response.status_code == 429
    assert second.response.headers["Retry-After"] == "60"
    elsewhere = make_flow(host=OHMYGPT_HOST)  # the global budget
    await admit(env, elsewhere)
    assert elsewhere.response is None


# -- commands --------------------------------------------------------------------------
def test_balance_command(env: Env) -> None:
    out = env.tctx.command(env.metering.balance, "alice")
    assert out == "openhands: $5.0000 · ohmygpt: $3.0000"
    with pytest.raises(exceptions.CommandError, match="no user"):
        env.tctx.command(env.metering.balance, "nobody")


async def test_usage_command(env: Env) -> None:
    flows = []
    for _ in range(2):
        f = make_flow()
        await admit(env, f)
        f.response = json_response({"choices": [], "usage": CHAT_USAGE})
        env.metering.response(f)
        flows.append(f)
    rejected = make_flow(key=None)
    await admit(env, rejected)
    out = env.metering.usage([*flows, rejected])
    assert out == "2 flows · 2,000/400 tokens · $0.0180"


async def test_shutdown_settles_requests_still_in_flight(env: Env) -> None:
    f, tap = await streaming(env)
    tap(chat_sse(["Hello there, this was streamed"], None))
    waiting = make_flow()
    await admit(env, waiting)
    arrived = make_flow()  # all in, its response hook still to run: the client gets it
    await admit(env, arrived)
    arrived.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    unpriced = make_flow()  # past requestheaders, its body not read yet
    await env.metering.requestheaders(unpriced)
    log = settled(env, f.id)  # done(): the proxy stops with all of them open
    assert log is not None and log["statusCode"] == 503 and log["creditsCost"] > 0
    assert log["usageSource"] == "estimated"
    unanswered = env.store.log(waiting.id)
    assert unanswered is not None and unanswered["creditsCost"] == 0
    # settled as cut off, so their clients must never see a complete answer
    assert f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE
    assert waiting.error is not None and unpriced.error is not None
    assert env.store.log(unpriced.id) is None, "never held, never forwarded"
    whole = env.store.log(arrived.id)
    assert whole is not None and arrived.error is None
    assert whole["statusCode"] == 200 and whole["usageSource"] == "reported"
    assert whole["creditsCost"] == Decimal("0.009")
    assert env.store.open_holds(utcnow() + timedelta(days=1)) == []


async def test_shutdown_settles_a_request_waiting_for_its_hold_at_zero(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its hold is made meanwhile (shutdown waits for the holds under way): the settlement
    at 0 releases it."""
    assert env.metering.store is not None
    hold_many = env.metering.store.hold_many
    asked = threading.Event()

    def slow_holds(*args: object) -> object:
        asked.set()
        time.sleep(0.1)
        return hold_many(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(env.metering.store, "hold_many", slow_holds)
    monkeypatch.setattr(env.metering.store, "try_hold", lambda request: None)  # the thread's
    f = make_flow()
    admitting = create_task(admit(env, f), name="admitting", keep_ref=False)
    assert await asyncio.to_thread(asked.wait, 5)
    phase = env.metering.phases[f]
    assert isinstance(phase, Quoted) and not isinstance(phase, Admitted)
    log = settled(env, f.id)  # done() before admission could go on
    admitting.cancel()
    await asyncio.gather(admitting, return_exceptions=True)
    assert log is not None and log["creditsCost"] == 0 and log["statusCode"] == 503
    assert log["model"] == "gpt-4o" and log["creditType"] == "openhands"
    assert env.store.open_holds(utcnow() + timedelta(days=1)) == []
    assert openhands_balance(env) == 5
    assert f.metadata["metering"]["outcome"] == "failed" and f.error is not None


# -- hostile requests: each read once, refused or metered as forwarded -----------------------
GEMINI_FLASH = "/v1beta/models/gemini-2.5-flash:generateContent"
GEMINI_BODY = {"contents": [{"parts": [{"text": "hi"}]}]}

REVERSE = "reverse:http://upstream.test:80"


async def test_a_fragment_cannot_make_a_completion_a_free_path(env: Env) -> None:
    f = make_flow("/v1/chat/completions#/v1/messages/count_tokens", mode=REVERSE)
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 400
    assert body_of(f)["error"]["code"] == "ambiguous_request"
    counted = make_flow("/v1/messages/./count_tokens", {"model": "x"}, mode=REVERSE)
    await admit(env, counted)
    assert counted.response is None and counted.request.path == "/v1/messages/count_tokens"


async def test_a_protocol_switch_is_refused_and_a_101_is_cut(env: Env) -> None:
    for headers in ((("upgrade", "websocket"), ("connection", "Upgrade")), (("Upgrade", "h2c"),)):
        f = make_flow(extra_headers=headers)
        await admit(env, f)
        assert f.response is not None and f.response.status_code == 400
    f = make_flow()
    await admit(env, f)
    f.response = http.Response.make(101, b"", {"upgrade": "websocket"})
    env.metering.responseheaders(f)
    assert f.error is not None and f.error.msg == flow.Error.KILLED_MESSAGE
    env.metering.error(f)  # mitmproxy's hook for the killed flow
    log = settled(env, f.id)
    assert log is not None and log["statusCode"] == 502
    assert log["creditsCost"] > 0, "the upstream may generate behind a 101: charged its hold"


async def test_a_request_mitmproxy_refused_is_printed_without_its_key(env: Env) -> None:
    """Two Content-Length values: mitmproxy answers 400 itself, runs requestheaders with
    the flow's error set, then the error hook, where its dumper prints the request before
    any script addon runs."""
    f = make_flow(
        f"{GEMINI_FLASH}?key={KEY}#x",
        extra_headers=(("x-goog-api-key", KEY), ("api-key", BOB_KEY), ("accept", "*/*")),
    )
    f.error = flow.Error("Received multiple content-length headers from client")
    await env.metering.requestheaders(f)
    printed = f.request.path + str(f.request.headers)
    assert KEY not in printed and BOB_KEY not in printed and "#" not in printed
    assert f.request.headers["accept"] == "*/*" and f.response is None


@pytest.mark.parametrize("status", [100, 102, 103])
async def test_an_interim_answer_is_502_in_the_api_shape_and_charged_the_hold(
    env: Env, status: int
) -> None:
    """mitmproxy takes an upstream's 1xx for the whole answer: passed on, the client waits
    for a final answer forever, and the upstream's own (with its usage) is never read."""
    f = make_flow()
    await admit(env, f)
    held = 5 - openhands_balance(env)
    f.response = http.Response.make(status, b"", {"link": "</x>"})
    env.metering.responseheaders(f)
    env.metering.response(f)
    assert f.response.status_code == 502 and body_of(f)["error"]["code"] == "upstream_error"
    log = settled(env, f.id)
    assert log is not None and log["statusCode"] == 502 and log["usageSource"] == "estimated"
    assert log["creditsCost"] == held > 0 and openhands_balance(env) == 5 - held


@given(name=st.sampled_from(["%6Bey", "KEY", "k%65Y", "%4B%45%59"]))
@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
async def test_a_gemini_key_under_an_encoded_name_is_stripped(env: Env, name: str) -> None:
    f = make_flow(f"{GEMINI_FLASH}?alt=sse&{name}={KEY}", GEMINI_BODY, key=None)
    await admit(env, f)
    assert f.response is None, body_of(f)
    assert KEY not in f.request.path and f.request.query.get("alt") == "sse"


async def test_two_different_keys_are_refused(env: Env) -> None:
    f = make_flow(extra_headers=(("x-api-key", BOB_KEY),))
    await admit(env, f)
    assert f.response is not None and body_of(f)["error"]["code"] == "ambiguous_request"


STRICT = (
    CONFIG.replace('[default_route]\npool = "ohmygpt"\nmultiplier = 1\n', "")
    + "route_multiplier = 1.15\n"
)


async def test_a_host_no_route_names_is_421(env: Env) -> None:
    env.config_path.write_text(STRICT)
    env.tctx.configure(env.metering, metering_key_cache_ttl=1)
    for host in ("unknown.example", "chat.trollllm.xyz.evil", "127.0.0.1"):
        f = make_flow(host=host, mode=REVERSE)
        await admit(env, f)
        assert f.response is not None and f.response.status_code == 421, host
        assert body_of(f)["error"]["code"] == "unknown_host"
    for host in (f"{OPENHANDS_HOST}.", OPENHANDS_HOST.upper(), f"{OPENHANDS_HOST}:8443"):
        f = make_flow(host=host, mode=REVERSE)
        await admit(env, f)
        assert f.response is None and env.metering.phases[f].pool == "openhands", host


async def test_http2_request_trailers_are_refused(env: Env) -> None:
    f = make_flow()
    f.request.http_version = "HTTP/2.0"
    await env.metering.requestheaders(f)
    f.request.trailers = http.Headers([(b"x-checksum", b"1")])
    await env.metering.request(f)
    assert f.response is not None and f.response.status_code == 400


async def test_usage_masks_are_refused(env: Env) -> None:
    for path, headers in [
        (f"{GEMINI_FLASH}?fields=candidates", ()),
        (f"{GEMINI_FLASH}?%24fields=candidates", ()),
        (f"{GEMINI_FLASH}?alt=proto", ()),
        (GEMINI_FLASH, (("X-Goog-FieldMask", "candidates"),)),
    ]:
        f = make_flow(path, GEMINI_BODY, extra_headers=headers)
        await admit(env, f)
        assert f.response is not None and body_of(f)["error"]["status"] == "INVALID_ARGUMENT"


async def test_an_answer_without_the_usage_its_api_always_reports_is_charged_the_hold(
    env: Env,
) -> None:
    f = make_flow(body={"model": "gpt-4o", "messages": [], "max_tokens": 1000})
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.hold is not None
    f.response = json_response({"model": "gpt-4o", "choices": [{"message": {"content": "hi"}}]})
    env.metering.response(f)
    assert f.metadata["metering"]["output_tokens"] == 1000
    log = settled(env, f.id)
    assert log is not None and Decimal(str(log["creditsCost"])) == admitted.hold.amount


async def test_a_duplicated_or_respelt_key_in_the_body_is_refused(env: Env) -> None:
    for raw in (
        b'{"model": "gpt-4o", "model": "claude-sonnet-4-5", "messages": []}',
        b'{"model": "gpt-4o", "Model": "claude-sonnet-4-5", "messages": []}',
        b'{"model": "gpt-4o", "messages": [{"role": "user", "role": "system", "content": ""}]}',
        b'{"contents": [], "generationConfig": {"maxOutputTokens": 1, "max_output_tokens": 9}}',
        b'{"model": "gpt-4o", "MAX_TOKENS": 100000, "messages": []}',  # Go matches it
        b'{"model": "gpt-4o", "\xc5\xbftream": true, "messages": []}',  # long s folds to s
    ):
        path = GEMINI_FLASH if b"contents" in raw else "/v1/chat/completions"
        f = make_flow(path, raw)
        await admit(env, f)
        assert f.response is not None and f.response.status_code == 400, raw


@pytest.mark.parametrize("raw", [b'"gpt-4o\\udcff"', b'"gpt\\u00004o"', b'"\\ud800"'])
async def test_a_model_name_that_is_no_text_is_refused(env: Env, raw: bytes) -> None:
    f = make_flow(body=b'{"model": ' + raw + b', "messages": []}')
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 400


async def test_a_key_in_the_body_is_refused(env: Env) -> None:
    f = make_flow(body={"model": "gpt-4o", "messages": [], "user": KEY})
    await admit(env, f)
    assert f.response is not None and body_of(f)["error"]["code"] == "ambiguous_request"
    assert env.metering.phases.get(f) is None


async def test_a_gemini_path_is_priced_as_the_model_it_resolves_to(env: Env) -> None:
    f = make_flow(
        "/v1beta/models/gpt-4o:countTokens/../../models/gemini-2.5-flash:generateContent",
        GEMINI_BODY,
    )
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.quote is not None and admitted.quote.model == "gemini-2.5-flash"
    assert f.request.path == GEMINI_FLASH


@pytest.mark.parametrize("name", ["GPT-4o", " gpt-4o", "gpt-4o\t", "gpt%2D4o", "GPT%2d4O "])
async def test_a_model_name_spelt_differently_is_priced_as_that_model(env: Env, name: str) -> None:
    f = make_flow(body={"model": name, "messages": []})
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.quote is not None and admitted.quote.model == "gpt-4o"


POOL_PRICED = (
    CONFIG
    + f"""
[[routes]]
host = "{OHMYGPT_HOST}"
pool = "ohmygpt"
multiplier = 3
"""
)


async def test_a_models_pool_override_bills_at_that_pools_multiplier(env: Env) -> None:
    env.config_path.write_text(POOL_PRICED)
    env.tctx.configure(env.metering, metering_key_cache_ttl=1)
    for host in (OPENHANDS_HOST, OHMYGPT_HOST, "other.test"):  # x2, x3, default x1
        f = make_flow(body={"model": "special", "messages": []}, host=host)
        await admit(env, f)
        admitted = env.metering.phases[f]
        assert admitted.pool == "ohmygpt" and admitted.quote is not None
        assert admitted.quote.multiplier == 3, host  # the dearest route billing ohmygpt


async def test_a_host_that_is_not_utf8_is_refused_before_any_hold(env: Env) -> None:
    """The canonical request refuses it; were it read, the journal's encoder makes any
    string safe (``tests/test_journal.py::test_any_client_strings_are_journaled_and_applied``)."""
    f = make_flow(mode=REVERSE)
    f.request.headers["host"] = b"chat.trollllm.xyz\xff".decode("utf-8", "surrogateescape")
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 400
    assert body_of(f)["error"]["code"] == "ambiguous_request"
    assert f not in env.metering.phases and openhands_balance(env) == Decimal("5")


async def test_a_settlement_that_cannot_be_priced_charges_the_hold(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = make_flow(body={"model": "gpt-4o", "max_tokens": 100, "messages": []})
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.hold is not None
    held = admitted.hold.amount

    def broken(*args: object) -> None:
        raise KeyError("an answer no test foresaw")

    monkeypatch.setattr(billing, "response_usage", broken)
    f.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    env.metering.response(f)
    log = settled(env, f.id)
    assert log is not None and log["creditsCost"] == held > 0
    assert log["usageSource"] == "estimated" and log["outputTokens"] == 100


async def test_one_flow_failing_to_settle_at_shutdown_does_not_stop_the_others(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    flows = []
    for _ in range(3):
        f = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
        await admit(env, f)
        f.response = sse_response()
        env.metering.responseheaders(f)
        env.metering.phases[f].tap(chat_sse(["some text"], None))  # type: ignore[misc]
        flows.append(f)
    real = billing.settlement

    def fails_for_the_first(f: http.HTTPFlow, *args: object) -> object:
        if f is flows[0]:
            raise RuntimeError("a bug in one flow's settlement")
        return real(f, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(billing, "settlement", fails_for_the_first)
    env.metering.done()
    assert env.store.log(flows[0].id) is None
    for f in flows[1:]:
        log = env.store.log(f.id)
        assert log is not None and log["statusCode"] == 503 and log["creditsCost"] > 0
    holds = env.store.open_holds(utcnow() + timedelta(days=1))
    assert [h.request_id for h in holds] == [flows[0].id], "the others' holds are closed"


async def test_stalled_request_bodies_take_no_journal_reserve(env: Env) -> None:
    env.tctx.configure(env.metering, metering_journal_max_kb=8)  # room for two in flight
    for _ in range(5):  # headers in, bodies never finished
        await env.metering.requestheaders(make_flow())
    paying = make_flow()
    await admit(env, paying)
    assert paying.response is None, "admitted: the stalled uploads hold no journal room"
    second = make_flow()
    await admit(env, second)
    third = make_flow()
    await admit(env, third)
    assert third.response is not None and third.response.status_code == 503


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ("/v1/chat/completions", chat_sse(["Hel", "lo"], CHAT_USAGE)),
        (
            "/v1/messages",
            b"".join(
                f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode()
                for e in (
                    {
                        "type": "message_start",
                        "message": {
                            "model": "claude-sonnet-4-5",
                            "usage": {"input_tokens": 1000, "output_tokens": 1},
                        },
                    },
                    {"type": "message_delta", "usage": {"output_tokens": 200}},
                    {"type": "message_stop"},
                )
            ),  # fmt: skip
        ),
    ],
)
async def test_a_stream_is_settled_at_its_end_event_not_at_the_end_of_the_message(
    env: Env, path: str, end: bytes
) -> None:
    model = "claude-sonnet-4-5" if path == "/v1/messages" else "gpt-4o"
    body = {"model": model, "max_tokens": 300, "messages": [], "stream": True}
    f = make_flow(path, body, key_header="x-api-key" if model != "gpt-4o" else "authorization")
    await admit(env, f)
    f.response = sse_response()
    env.metering.responseheaders(f)
    tap = f.response.stream
    assert callable(tap)
    tap(end)  # the upstream holds the connection open after the end event
    assert env.metering.writer is not None and env.metering.writer.journal.size > 0
    record = f.metadata["metering"]
    assert record["usage_source"] == "reported" and record["output_tokens"] == 200
    assert f not in env.metering.phases
    tap(b"")
    env.metering.response(f)  # the end of the message comes later: no second settlement
    f.error = flow.Error("Client disconnected.")
    env.metering.error(f)
    log = settled(env, f.id)
    assert log is not None and log["outputTokens"] == 200 and log["statusCode"] == 200
    assert env.store.open_holds(utcnow() + timedelta(days=1)) == []


def forwarded(f: http.HTTPFlow) -> dict:
    return json.loads(f.request.content or b"")


async def test_the_forwarded_output_limit_is_what_the_hold_pays_for(env: Env) -> None:
    unlimited = make_flow(body={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    await admit(env, unlimited)
    assert unlimited.response is None
    assert forwarded(unlimited)["max_completion_tokens"] == 8192, "the default, held for"
    gemini = make_flow("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": []})
    await admit(env, gemini)
    assert forwarded(gemini)["generationConfig"] == {"maxOutputTokens": 8192}
    lower = make_flow(body={"model": "gpt-4o", "max_tokens": 10, "messages": []})
    await admit(env, lower)
    assert forwarded(lower) == {"model": "gpt-4o", "max_tokens": 10, "messages": []}


async def test_a_balance_that_covers_part_of_the_hold_caps_the_output_lower(env: Env) -> None:
    carol = "sk-burn-carol-0123456789abcdef"
    env.store.create_user("carol", hash_key(carol), {"creditsNew": Decimal("0.01")})
    body = {"model": "gpt-4o", "max_tokens": 100_000, "messages": []}
    f = make_flow(body=body, key=carol)
    await admit(env, f)
    admitted = env.metering.phases[f]
    assert admitted.hold is not None and admitted.hold.amount == Decimal("0.01")
    limit = forwarded(f)["max_tokens"]
    # gpt-4o: input 2.5 and output 10 USD per million, route multiplier 2
    input_cost = admitted.estimate.held_input_tokens * Decimal("2.5") * 2 / 1_000_000  # type: ignore[union-attr]
    per_token = Decimal(10) * 2 / 1_000_000
    assert limit == int((Decimal("0.01") - input_cost) / per_token) < 100_000
    assert (
        (limit + 1) * per_token + input_cost
        > admitted.hold.amount
        >= limit * per_token + input_cost
    )


async def test_cap_output_tokens_false_forwards_the_limit_as_sent(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "nocap.toml"
    config.write_text("cap_output_tokens = false\n" + CONFIG)
    env.tctx.configure(env.metering, metering_config=str(config))
    f = make_flow(body={"model": "gpt-4o", "messages": []})
    await admit(env, f)
    assert f.response is None and "max_completion_tokens" not in forwarded(f)


async def test_a_journal_that_cannot_be_written_refuses_service_until_it_can(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert env.metering.writer is not None
    journal = env.metering.writer.journal
    disk = FullDisk(journal, monkeypatch)
    served = make_flow()
    await admit(env, served)  # admitted before the disk filled up
    served.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    with caplog.at_level(logging.ERROR):
        env.metering.response(served)
    assert "settlement not journaled" in caplog.text and served.id in caplog.text
    refused = make_flow()
    await admit(env, refused)
    assert refused.response is not None and refused.response.status_code == 503
    assert "journal" in body_of(refused)["error"]["message"]
    disk.full = False  # space again: the next admission's probe write succeeds
    later = make_flow()
    await admit(env, later)
    assert later.response is None
    later.response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    env.metering.response(later)  # the refused settlement is journaled first
    env.metering.done()
    for f in (served, later):
        log = env.store.log(f.id)
        assert log is not None and log["creditsCost"] == Decimal("0.009")
    assert env.store.log(refused.id) is None
    assert openhands_balance(env) == 5 - 2 * Decimal("0.009")


def test_mitmproxy_refuses_request_bodies_past_max_request_bytes(env: Env) -> None:
    """mitmproxy buffers a body before the request hook, whatever its framing: its own
    limit is what stops a chunked body with no content-length to refuse it by."""
    m = Metering()
    with taddons.context(proxyserver.Proxyserver(), m) as tctx:
        tctx.configure(
            m,
            metering_config=str(env.config_path),
            metering_db=env.db_url,
            metering_journal=str(env.config_path.with_name("limits.journal")),
        )
        assert tctx.options.body_size_limit == "4096"  # the config's max_request_bytes
        m.done()


@pytest.mark.parametrize("key", [b"sk-burn-\xff\xfe", b"\xc3(" + b"x" * 20])
async def test_a_key_that_is_not_utf8_is_401_not_a_failure(env: Env, key: bytes) -> None:
    f = make_flow()
    f.request.headers["authorization"] = "Bearer " + key.decode("utf-8", "surrogateescape")
    await admit(env, f)
    assert f.response is not None and f.response.status_code == 401


HOSTILE = st.text(
    st.one_of(st.characters(codec=None, exclude_categories=()), st.characters(categories=["Cs"])),
    max_size=2000,
)
HEADER_BYTES = st.binary(max_size=2000).map(lambda raw: raw.decode("utf-8", "surrogateescape"))
"""What a header value can hold: any bytes, as mitmproxy decodes them (surrogateescape)."""


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    host_suffix=HEADER_BYTES,
    model=HOSTILE.filter(bool),  # a JSON string: any code point, "\ud800" escapes too
    key_suffix=st.one_of(st.just(""), st.just(""), HEADER_BYTES),  # mostly the valid key
)
def test_whatever_the_client_sends_a_forwarded_request_is_journaled(
    env: Env, tmp_path: Path, host_suffix: str, model: str, key_suffix: str
) -> None:
    """Host, model name and key of any content and length: every request that was
    forwarded has a journal record the store applies; the others were answered locally."""
    config = tmp_path / "default-price.toml"
    if not config.exists():
        config.write_text(
            CONFIG.replace('unknown_model = "reject"', 'unknown_model = "default"')
            + "\n[default_price]\ninput = 1.0\noutput = 2.0\n"
        )
        env.tctx.configure(env.metering, metering_config=str(config))
    assert env.metering.writer is not None
    body = {"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": model}]}
    f = make_flow(body=body)
    f.request.headers["host"] = OPENHANDS_HOST + host_suffix
    if key_suffix:
        f.request.headers["authorization"] = f"Bearer {KEY}{key_suffix}"
    asyncio.run(admit(env, f))
    if f.response is not None:  # answered locally: never forwarded, nothing to settle
        assert 400 <= f.response.status_code < 600 and f not in env.metering.phases
        return
    f.response = json_response({"model": model, "choices": [], "usage": CHAT_USAGE})
    env.metering.response(f)
    hypothesis.event("forwarded")
    records = {s.request_id for _, s in env.metering.writer.journal.pending(10_000)}
    assert f.id in records or env.store.log(f.id) is not None


async def test_a_stream_with_oversized_events_says_so_in_its_record(env: Env) -> None:
    """An event past the parser's limit is passed on unread (a usage in it is not seen): the
    flow's record counts them, and the comment shows the tokens that were charged."""
    f, tap = await streaming(env)
    body = b"data: " + b"x" * (MAX_EVENT_BYTES + 1) + b"\n\n" + chat_sse(["Hi"], CHAT_USAGE)
    assert tap(body) + tap(b"") == body
    env.metering.response(f)
    record = f.metadata["metering"]
    assert record["oversized_events"] == 1
    assert record["total_tokens"] == 1200 and "1,200 tok" in f.comment
