"""The addon end to end: official SDKs -> mitmdump -s addons/metering.py -> fake upstream.

Each test makes its own users on the shared proxy and waits for the asynchronously written
request logs before it looks at balances.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from burnmeter import money
from burnmeter.config import Config
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from scripts.fake_upstream import prompt_tokens
from tests.e2e.harness import OHMYGPT_HOST
from tests.e2e.harness import OHMYGPT_UPSTREAM_KEY
from tests.e2e.harness import OPENHANDS_HOST
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import wait_logs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

MESSAGES: list[Any] = [{"role": "user", "content": "Count from one to twenty, slowly."}]
MULTIPLIER = {OPENHANDS_HOST: Decimal("1.02"), OHMYGPT_HOST: Decimal("1.15")}
POOL = {OPENHANDS_HOST: "openhands", OHMYGPT_HOST: "ohmygpt"}


@dataclass(frozen=True)
class Tokens:
    """Normalised usage the fake upstream reports: input excludes cached tokens."""

    model: str
    input: int
    output: int
    cache_write: int = 0
    cache_read: int = 0


def expected_charge(config: Config, tokens: Tokens, host: str) -> tuple[Decimal, int]:
    """(creditsCost, tokensUsed) by the formulas of docs/routing.md, from the config's prices."""
    found = config.model(tokens.model)
    assert found is not None
    price = found[1]
    cache_write = price.input if price.cache_write is None else price.cache_write
    cache_read = price.input if price.cache_read is None else price.cache_read
    weighted = (
        tokens.input * price.input
        + tokens.output * price.output
        + tokens.cache_write * cache_write
        + tokens.cache_read * cache_read
    )
    multiplier = MULTIPLIER[host] * price.multiplier
    cost = money.quantize(weighted / 1_000_000 * multiplier)
    billing = (
        (tokens.input + tokens.output) * price.input
        + tokens.cache_write * cache_write
        + tokens.cache_read * cache_read
    )
    return cost, int(billing * multiplier // price.input)


def oa(proxy: Proxy, key: str, host: str = OPENHANDS_HOST) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=proxy.base_url + "/v1",
        api_key=key,
        default_headers={"Host": host},
        max_retries=0,
        timeout=20,
    )


def an(proxy: Proxy, key: str, host: str = OPENHANDS_HOST) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy.base_url,
        api_key=key,
        default_headers={"Host": host},
        max_retries=0,
        timeout=20,
    )


def succeeded(log: Document) -> bool:
    return bool(log["statusCode"] == 200)


# -- one request of each kind, returning what the upstream reported -------------------------
def chat_json(proxy: Proxy, key: str, host: str) -> Tokens:
    r = oa(proxy, key, host).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, extra_body={"x_chunks": 7, "x_cache_read": 5}
    )
    assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 "
    return Tokens("fake-gpt", prompt_tokens(MESSAGES), 7, cache_read=5)


def chat_stream(proxy: Proxy, key: str, host: str) -> Tokens:
    chunks = list(
        oa(proxy, key, host).chat.completions.create(
            model="fake-gpt",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"x_chunks": 9, "x_split": 7},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).count("tok") == 9
    return Tokens("fake-gpt", prompt_tokens(MESSAGES), 9)


def responses_stream(proxy: Proxy, key: str, host: str) -> Tokens:
    events = list(
        oa(proxy, key, host).responses.create(
            model="fake-gpt", input="Say hi.", stream=True, extra_body={"x_chunks": 4}
        )
    )
    assert events[-1].type == "response.completed"
    return Tokens("fake-gpt", prompt_tokens("Say hi."), 4)


def embeddings(proxy: Proxy, key: str, host: str) -> Tokens:
    inputs = ["first text to embed", "second"]
    e = oa(proxy, key, host).embeddings.create(model="fake-embed", input=inputs)
    assert len(e.data) == 2
    return Tokens("fake-embed", prompt_tokens(inputs), 0)


def messages_json(proxy: Proxy, key: str, host: str) -> Tokens:
    m = an(proxy, key, host).messages.create(
        model="fake-claude-latest",  # an alias: priced as fake-claude
        max_tokens=64,
        messages=MESSAGES,
        extra_body={"x_chunks": 6, "x_cache_write": 20, "x_cache_read": 10},
    )
    assert m.usage.output_tokens == 6
    return Tokens("fake-claude", prompt_tokens(MESSAGES), 6, cache_write=20, cache_read=10)


def messages_stream(proxy: Proxy, key: str, host: str) -> Tokens:
    with an(proxy, key, host).messages.stream(
        model="fake-claude",
        max_tokens=64,
        messages=MESSAGES,
        extra_body={"x_chunks": 8, "x_cache_write": 30, "x_cache_read": 40, "x_split": 5},
    ) as stream:
        final = stream.get_final_message()
    assert final.usage.output_tokens == 8
    return Tokens("fake-claude", prompt_tokens(MESSAGES), 8, cache_write=30, cache_read=40)


SENDERS: dict[str, Callable[[Proxy, str, str], Tokens]] = {
    "chat-json": chat_json,
    "chat-stream": chat_stream,
    "responses-stream": responses_stream,
    "embeddings": embeddings,
    "messages-json": messages_json,
    "messages-stream": messages_stream,
}


@pytest.mark.parametrize("host", [OPENHANDS_HOST, OHMYGPT_HOST])
@pytest.mark.parametrize("kind", list(SENDERS))
def test_charge_matches_price_formula_and_pool(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config, kind: str, host: str
) -> None:
    account = accounts.new(creditsNew="5", credits="5", refCredits="0")
    pool = POOL[host]
    other = config.pools["ohmygpt" if pool == "openhands" else "openhands"]

    tokens = SENDERS[kind](proxy, account.key, host)

    (log,) = wait_logs(store, account.user_id, 1)
    cost, billing = expected_charge(config, tokens, host)
    assert cost > 0
    assert log["creditType"] == pool
    assert log["creditsCost"] == cost, f"{kind}: logged {log['creditsCost']}, formula {cost}"
    assert log["tokensUsed"] == billing
    assert (log["inputTokens"], log["outputTokens"]) == (tokens.input, tokens.output)
    assert (log["cacheWriteTokens"], log["cacheHitTokens"]) == (
        tokens.cache_write,
        tokens.cache_read,
    )
    assert log["usageSource"] == "reported" and log["isSuccess"] and log["statusCode"] == 200
    assert log["host"] == host and log["userId"] == account.user_id
    assert account.key not in json.dumps(log, default=str)

    assert store.balance(account.user_id, config.pools[pool]) == Decimal(5) - cost
    assert store.balance(account.user_id, other) == Decimal(5)
    user = store.user(account.user_id)
    assert user is not None
    used_field = config.pools[pool].used
    assert user[used_field] == cost
    assert user["totalInputTokens"] == tokens.input
    assert user["totalOutputTokens"] == tokens.output
    if pool == "openhands":
        assert user["tokensUserNew"] == billing


def test_ohmygpt_spends_credits_before_ref_credits(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config
) -> None:
    account = accounts.new(credits="0.001", refCredits="5")
    oa(proxy, account.key, OHMYGPT_HOST).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, extra_body={"x_chunks": 200}
    )
    (log,) = wait_logs(store, account.user_id, 1)
    cost, _ = expected_charge(
        config, Tokens("fake-gpt", prompt_tokens(MESSAGES), 200), OHMYGPT_HOST
    )
    assert log["creditType"] == "ohmygpt" and log["creditsCost"] == cost > Decimal("0.001")
    user = store.user(account.user_id)
    assert user is not None
    assert user["credits"] == 0
    assert user["refCredits"] == Decimal(5) - (cost - Decimal("0.001"))
    assert user["creditsUsed"] == cost
    assert user.get("creditsNew", 0) == 0


def test_openai_stream_without_include_usage_is_still_charged(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts, config: Config
) -> None:
    account = accounts.new(creditsNew="5")
    upstream.reset()
    chunks = list(
        oa(proxy, account.key).chat.completions.create(
            model="fake-gpt", messages=MESSAGES, stream=True, extra_body={"x_chunks": 5}
        )
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 5
    (seen,) = upstream.stats()["recent"]
    assert seen["stream_options"] == {"include_usage": True}, "proxy did not inject include_usage"

    (log,) = wait_logs(store, account.user_id, 1)
    cost, _ = expected_charge(
        config, Tokens("fake-gpt", prompt_tokens(MESSAGES), 5), OPENHANDS_HOST
    )
    assert log["usageSource"] == "reported"
    assert log["creditsCost"] == cost > 0


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("host", [OPENHANDS_HOST, OHMYGPT_HOST])
def test_upstream_gets_its_own_host_and_key_never_the_clients(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts, host: str, api: str
) -> None:
    account = accounts.new(creditsNew="5", credits="5")
    upstream.reset()
    send = chat_stream if api == "openai" else messages_json
    send(proxy, account.key, host)
    (seen,) = upstream.stats()["recent"]
    assert seen["host"] == f"127.0.0.1:{upstream.port}"
    credentials = (seen["authorization"], seen["x_api_key"])
    if host == OPENHANDS_HOST:  # no upstream key configured: none is sent
        assert credentials == (None, None)
    elif api == "openai":
        assert credentials == (f"Bearer {OHMYGPT_UPSTREAM_KEY}", None)
    else:
        assert credentials == (None, OHMYGPT_UPSTREAM_KEY)
    if seen["stream"]:
        assert seen["accept_encoding"] == "identity"
    wait_logs(store, account.user_id, 1)


def test_anthropic_path_accepts_bearer_too(proxy: Proxy, store: Store, accounts: Accounts) -> None:
    account = accounts.new(creditsNew="5")
    client = anthropic.Anthropic(
        base_url=proxy.base_url,
        auth_token=account.key,
        default_headers={"Host": OPENHANDS_HOST},
        max_retries=0,
    )
    client.messages.create(model="fake-claude", max_tokens=8, messages=MESSAGES)
    (log,) = wait_logs(store, account.user_id, 1)
    assert log["creditsCost"] > 0 and log["path"] == "/v1/messages"


def test_upstream_error_is_logged_free_and_passed_through(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config
) -> None:
    account = accounts.new(creditsNew="5")
    with pytest.raises(openai.InternalServerError) as e:
        oa(proxy, account.key).chat.completions.create(
            model="fake-gpt", messages=MESSAGES, extra_body={"x_status": 500}
        )
    assert e.value.code == "server_error"  # the upstream's own body reached the client
    (log,) = wait_logs(store, account.user_id, 1)
    assert (log["statusCode"], log["isSuccess"], log["creditsCost"]) == (500, False, 0)
    assert store.balance(account.user_id, config.pools["openhands"]) == 5  # hold released


def test_stream_cut_by_upstream_is_charged(
    proxy: Proxy, store: Store, accounts: Accounts, config: Config
) -> None:
    account = accounts.new(creditsNew="5")
    with pytest.raises(openai.APIConnectionError):
        list(
            oa(proxy, account.key).chat.completions.create(
                model="fake-gpt",
                messages=MESSAGES,
                stream=True,
                extra_body={"x_chunks": 30, "x_abort_after": 6},
            )
        )
    (log,) = wait_logs(store, account.user_id, 1)
    assert log["creditsCost"] > 0 and log["outputTokens"] >= 1, f"cut stream not charged: {log}"
    assert log["usageSource"] == "estimated" and not log["isSuccess"]
    assert store.balance(account.user_id, config.pools["openhands"]) == 5 - log["creditsCost"]


def test_non_llm_path_passes_with_auth_and_is_free(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts, config: Config
) -> None:
    account = accounts.new(creditsNew="1")
    upstream.reset()
    models = [m.id for m in oa(proxy, account.key).models.list()]
    assert "fake-gpt" in models
    assert upstream.stats()["requests"] == {"/v1/models": 1}
    time.sleep(0.3)  # a wrong charge would be written asynchronously
    assert sum((log["creditsCost"] for log in store.logs(10, account.user_id)), Decimal(0)) == 0
    assert store.balance(account.user_id, config.pools["openhands"]) == Decimal(1)


# -- rejections: answered by the proxy, in the API's own shape ----------------------------
def test_unknown_or_revoked_key_is_401_in_each_api_shape(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts
) -> None:
    upstream.reset()
    with pytest.raises(openai.AuthenticationError) as oe:
        oa(proxy, accounts.unknown_key()).chat.completions.create(
            model="fake-gpt", messages=MESSAGES
        )
    assert oe.value.status_code == 401
    assert isinstance(oe.value.body, dict) and {"message", "type", "code"} <= set(oe.value.body)

    with pytest.raises(anthropic.AuthenticationError) as ae:
        an(proxy, accounts.unknown_key()).messages.create(
            model="fake-claude", max_tokens=8, messages=MESSAGES
        )
    assert ae.value.status_code == 401
    body = ae.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}

    revoked = accounts.new(creditsNew="5")
    store.set_fields(revoked.user_id, {"isActive": False})
    with pytest.raises(openai.AuthenticationError) as revoked_error:
        oa(proxy, revoked.key).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert revoked_error.value.code == "revoked_api_key"

    missing = httpx.post(
        proxy.base_url + "/v1/chat/completions",
        headers={"Host": OPENHANDS_HOST},
        json={"model": "fake-gpt", "messages": MESSAGES},
    )
    assert missing.status_code == 401 and set(missing.json()["error"]) >= {"message", "code"}

    stats = upstream.stats()
    assert (stats["total"], stats["connections"]) == (0, 0), "a rejected request reached upstream"


def test_insufficient_and_expired_are_402(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts
) -> None:
    broke = accounts.new(creditsNew="0", credits="3")
    expired = accounts.new(creditsNew="3")
    store.set_fields(expired.user_id, {"expiresAtNew": datetime.now(UTC) - timedelta(days=1)})
    upstream.reset()

    with pytest.raises(openai.APIStatusError) as oe:
        oa(proxy, broke.key).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    assert oe.value.status_code == 402 and oe.value.code == "insufficient_credits"

    with pytest.raises(anthropic.APIStatusError) as ae:
        an(proxy, broke.key).messages.create(model="fake-claude", max_tokens=8, messages=MESSAGES)
    assert ae.value.status_code == 402
    assert isinstance(ae.value.body, dict) and ae.value.body["type"] == "error"
    assert "insufficient_credits" in json.dumps(ae.value.body)

    with pytest.raises(openai.APIStatusError) as ee:
        oa(proxy, expired.key).chat.completions.create(
            model="fake-gpt", messages=MESSAGES, stream=True
        )
    assert ee.value.status_code == 402 and ee.value.code == "credits_expired"

    # the same user's other pool still works: the expiry is per pool
    oa(proxy, broke.key, OHMYGPT_HOST).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    stats = upstream.stats()
    assert stats["requests"] == {"/v1/chat/completions": 1}, "a rejected request reached upstream"


def test_unknown_model_is_refused_not_free(
    proxy: Proxy, upstream: Upstream, accounts: Accounts
) -> None:
    account = accounts.new(creditsNew="5")
    upstream.reset()
    with pytest.raises(openai.BadRequestError) as e:
        oa(proxy, account.key).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert e.value.status_code == 400
    assert upstream.stats()["total"] == 0


# -- streams -------------------------------------------------------------------------------
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_client_disconnect_mid_stream_is_charged(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts, config: Config, api: str
) -> None:
    account = accounts.new(creditsNew="5")
    upstream.reset()
    knobs = {"x_chunks": 40, "x_delay_ms": 50}
    if api == "openai":
        path = "/v1/chat/completions"
        body: dict[str, Any] = {"model": "fake-gpt", "messages": MESSAGES, "stream": True}
        headers = {"Authorization": f"Bearer {account.key}"}
    else:
        path = "/v1/messages"
        body = {"model": "fake-claude", "max_tokens": 100, "messages": MESSAGES, "stream": True}
        headers = {"x-api-key": account.key, "anthropic-version": "2023-06-01"}
    events = 0
    with httpx.Client(base_url=proxy.base_url, headers={"Host": OPENHANDS_HOST}) as client:
        with client.stream("POST", path, json=body | knobs, headers=headers, timeout=10) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                events += line.count('"tok')  # content text, not "output_tokens"
                if events >= 4:
                    break  # closing the stream here drops the connection mid-generation

    (log,) = wait_logs(store, account.user_id, 1)
    assert log["creditsCost"] > 0, f"disconnect charged nothing: {log}"
    assert log["usageSource"] in ("reported", "estimated")
    assert log["outputTokens"] >= 1, "generated tokens were not counted"
    assert store.balance(account.user_id, config.pools["openhands"]) == 5 - log["creditsCost"]
    deadline = time.monotonic() + 5
    while upstream.stats()["aborted"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert upstream.stats()["aborted"] == 1, "the proxy kept the upstream stream running"


def test_first_sse_byte_is_not_buffered(proxy: Proxy, accounts: Accounts) -> None:
    account = accounts.new(creditsNew="5")
    body = {
        "model": "fake-gpt",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {account.key}", "Host": OPENHANDS_HOST}
    with httpx.Client(base_url=proxy.base_url, headers=headers, timeout=10) as client:
        client.post(
            "/v1/chat/completions", json=body | {"x_chunks": 1}
        ).raise_for_status()  # warm-up
        start = time.monotonic()
        with client.stream(
            "POST", "/v1/chat/completions", json=body | {"x_chunks": 20, "x_delay_ms": 50}
        ) as r:
            raw = r.iter_raw()
            first = next(raw)
            ttfb = time.monotonic() - start
            rest = b"".join(raw)
        total = time.monotonic() - start
    assert first.startswith(b"data: ")
    assert (first + rest).count(b'"tok') == 20
    assert total >= 0.9
    assert ttfb < 0.3, f"first byte after {ttfb:.3f}s of a {total:.3f}s stream: buffered"


@pytest.mark.parametrize("processes", [1, 2])
async def test_parallel_streams_cannot_overdraw(
    proxy: Proxy,
    upstream: Upstream,
    store: Store,
    accounts: Accounts,
    config: Config,
    tmp_path: Path,
    processes: int,
) -> None:
    """40 parallel streams on a balance for 5, through one proxy or two sharing the store."""
    tokens = Tokens("fake-gpt", prompt_tokens(MESSAGES), 50)
    one, _ = expected_charge(config, tokens, OPENHANDS_HOST)
    start_balance = 5 * one
    account = accounts.new(creditsNew=start_balance)
    body = {
        "model": "fake-gpt",
        "messages": MESSAGES,
        "max_tokens": 50,  # so that the hold estimate is close to the real cost
        "stream": True,
        "stream_options": {"include_usage": True},
        "x_chunks": 50,
        "x_delay_ms": 10,
    }
    headers = {"Authorization": f"Bearer {account.key}", "Host": OPENHANDS_HOST}
    proxies = [proxy]
    if processes == 2:
        proxies.append(Proxy(upstream, proxy.config_path, proxy.db_path, tmp_path))
        proxies[1].start()

    async def one_stream(client: httpx.AsyncClient, base_url: str) -> int:
        async with client.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
            await r.aread()
            return r.status_code

    try:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:
            statuses = await asyncio.gather(
                *(one_stream(client, proxies[i % processes].base_url) for i in range(40))
            )
    finally:
        if processes == 2:
            proxies[1].stop()

    ok = statuses.count(200)
    assert statuses.count(402) == 40 - ok, f"statuses: {sorted(set(statuses))}"
    assert 1 <= ok <= 10, f"{ok} of 40 streams admitted on a balance for about 5"
    logs = await asyncio.to_thread(wait_logs, store, account.user_id, ok, succeeded)
    assert all(log["creditsCost"] > 0 for log in logs if succeeded(log))
    spent = sum((log["creditsCost"] for log in logs), Decimal(0))
    balance = store.balance(account.user_id, config.pools["openhands"])
    assert start_balance - balance == spent, "balance change differs from the logged costs"
    assert balance >= -one, f"overdrawn to {balance} (one request costs {one})"
    open_holds = [
        h
        for h in store.open_holds(datetime.now(UTC) + timedelta(hours=1))
        if h.user_id == account.user_id
    ]
    assert open_holds == []


async def test_sigterm_loses_no_settlement(
    proxy: Proxy, upstream: Upstream, store: Store, accounts: Accounts, tmp_path: Path
) -> None:
    """A second proxy on the same database, stopped right after its last answer."""
    second = Proxy(upstream, proxy.config_path, proxy.db_path, tmp_path)
    second.start()
    try:
        account = accounts.new(creditsNew="5")
        headers = {"Authorization": f"Bearer {account.key}", "Host": OPENHANDS_HOST}
        body = {"model": "fake-gpt", "messages": MESSAGES, "x_chunks": 2}
        async with httpx.AsyncClient(base_url=second.base_url, headers=headers) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(20))
            )
        assert [a.status_code for a in answers] == [200] * 20
    finally:
        returncode = second.stop()
    assert returncode == 0, second.output()
    assert "Traceback" not in second.output()
    assert len(store.logs(100, account.user_id)) == 20


# -- last: neither this nor any test before it may have leaked a key ---------------------
def test_no_raw_key_in_proxy_output_or_database(
    proxy: Proxy, store: Store, accounts: Accounts
) -> None:
    account = accounts.new(creditsNew="1")
    chat_stream(proxy, account.key, OPENHANDS_HOST)
    with pytest.raises(openai.AuthenticationError):
        chat_json(proxy, accounts.unknown_key(), OPENHANDS_HOST)
    wait_logs(store, account.user_id, 1)
    time.sleep(0.3)  # let the terminal log catch up
    haystacks = {"mitmdump output": proxy.output().encode()}
    files = [*proxy.db_path.parent.glob(proxy.db_path.name + "*"), proxy.journal_path]
    for path in files:
        if path.exists():
            haystacks[path.name] = path.read_bytes()
    assert any(haystacks.values())
    for key in [*accounts.keys, OHMYGPT_UPSTREAM_KEY]:
        secret = key.split("-")[-1].encode()
        for name, data in haystacks.items():
            assert secret not in data, f"a raw API key appears in {name}"
