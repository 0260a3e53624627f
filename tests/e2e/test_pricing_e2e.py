"""Prices as providers bill them, through the real proxy: tiers, modalities, fees, service tiers.

List-priced models are charged what genai-prices' own calculation says (``calc_price``,
independently of burnmeter's path to it) times the route's multiplier, to the nano-dollar.
The operator's own model is charged by the hand-computed formula of its config.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import genai_prices
import httpx
import openai
import pytest
from click.testing import CliRunner

from burnmeter import money
from burnmeter.config import Config
from burnmeter.config import load_config
from burnmeter.estimate import estimate_request
from burnmeter.estimate import hold_amounts
from burnmeter.pricing import resolve_price
from burnmeter.store import open_store
from burnmeter.store.base import Document
from burnmeter.store.base import Store
from scripts.fake_upstream import prompt_tokens
from stats.cli import cli
from tests.e2e.harness import Accounts
from tests.e2e.harness import Proxy
from tests.e2e.harness import Upstream
from tests.e2e.harness import wait_logs
from tests.e2e.test_proxy_e2e import MESSAGES
from tests.e2e.test_proxy_e2e import an
from tests.e2e.test_proxy_e2e import oa

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

HOST = "priced.test"
MULTIPLIER = Decimal("1.02")
CONFIG_TOML = f"""\
unknown_model = "list-price"
log_ttl_days = 0

[[routes]]
host = "{HOST}"
pool = "openhands"
multiplier = {MULTIPLIER}

# The operator's own model: every class priced, a long-context tier, a priority tier.
[models."acme-omni"]
input = 2.0
output = 8.0
cache_read = 0.2
input_audio = 16.0
output_audio = 32.0
input_image = 4.0
output_image = 40.0
web_search = 0.01

[[models."acme-omni".tiers]]
above = 100_000
input = 4.0
output = 12.0
cache_read = 0.4

[models."acme-omni".service_tiers.priority]
input = 3.5
output = 14.0

# A list price's structure (its tiers, cache rates and fees) with one rate of the operator's.
[models."my-sonnet"]
list_price = "claude-sonnet-4-5"
output = 12.0
"""
PROMPT = prompt_tokens(MESSAGES)  # what the fake reports when x_usage leaves the prompt be


@pytest.fixture(scope="module")
def priced_proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    workdir = tmp_path_factory.mktemp("pricing")
    config_path = workdir / "burnmeter.toml"
    config_path.write_text(CONFIG_TOML)
    config_path.chmod(0o600)
    with Proxy(upstream, config_path, workdir / "burnmeter.db", workdir) as handle:
        yield handle


@pytest.fixture(scope="module")
def priced_config(priced_proxy: Proxy) -> Config:
    return load_config(priced_proxy.config_path)


@pytest.fixture(scope="module")
def priced_store(priced_proxy: Proxy, priced_config: Config) -> Iterator[Store]:
    opened = open_store(priced_proxy.db_url, priced_config.pools)
    opened.ensure_schema(0)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="module")
def priced_accounts(priced_store: Store) -> Accounts:
    return Accounts(priced_store)


# -- requests -------------------------------------------------------------------------------
def chat(proxy: Proxy, key: str, model: str, stream: bool = False, **extra: Any) -> None:
    client = oa(proxy, key, HOST)
    if stream:
        chunks = client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        assert list(chunks)
    else:
        assert client.chat.completions.create(model=model, messages=MESSAGES, extra_body=extra)


def messages(proxy: Proxy, key: str, model: str, stream: bool = False, **extra: Any) -> None:
    client = an(proxy, key, HOST)
    if stream:
        with client.messages.stream(
            model=model, max_tokens=1024, messages=MESSAGES, extra_body=extra
        ) as events:
            events.get_final_message()
    else:
        client.messages.create(model=model, max_tokens=1024, messages=MESSAGES, extra_body=extra)


def gemini(proxy: Proxy, key: str, model: str, stream: bool = False, **extra: Any) -> None:
    assert not stream  # the fake answers Gemini in JSON only
    body = {"contents": [{"role": "user", "parts": [{"text": "Describe it."}]}], **extra}
    r = httpx.post(
        f"{proxy.base_url}/v1beta/models/{model}:generateContent",
        json=body,
        headers={"Host": HOST, "Authorization": f"Bearer {key}"},
        timeout=20,
    )
    assert r.status_code == 200, r.text


Send = Callable[..., None]


@dataclass(frozen=True)
class ListCase:
    """A request to a list-priced model, and genai-prices' own usage and context for it."""

    send: Send
    model: str
    extra: dict[str, Any]
    usage: dict[str, int]
    provider: str
    logged: dict[str, Any]
    stream: bool = False
    price_context: dict[str, str] | None = None


LIST_CASES = {
    "sonnet-500k-long-context": ListCase(
        messages,
        "claude-sonnet-4-5",
        {"x_usage": {"input_tokens": 500_000, "output_tokens": 1_000}},
        {"input_tokens": 500_000, "output_tokens": 1_000},
        "anthropic",
        {"inputTokens": 500_000, "outputTokens": 1_000},
    ),
    "sonnet-web-search-20-stream": ListCase(
        messages,
        "claude-sonnet-4-5",
        {"x_usage": {"output_tokens": 300, "server_tool_use": {"web_search_requests": 20}}},
        {"input_tokens": PROMPT, "output_tokens": 300, "web_searches": 20},
        "anthropic",
        {"webSearchRequests": 20},
        stream=True,
    ),
    "gemini-2.5-pro-300k": ListCase(
        gemini,
        "gemini-2.5-pro",
        {"x_usage": {"promptTokenCount": 300_000, "candidatesTokenCount": 2_000}},
        {"input_tokens": 300_000, "output_tokens": 2_000},
        "google",
        {"inputTokens": 300_000},
    ),
    "gemini-2.5-flash-100k-audio": ListCase(
        gemini,
        "gemini-2.5-flash",
        {
            "x_usage": {
                "promptTokenCount": 100_012,
                "promptTokensDetails": [
                    {"modality": "TEXT", "tokenCount": 12},
                    {"modality": "AUDIO", "tokenCount": 100_000},
                ],
                "candidatesTokenCount": 400,
            }
        },
        {"input_tokens": 100_012, "input_audio_tokens": 100_000, "output_tokens": 400},
        "google",
        {"inputTokens": 100_012, "inputAudioTokens": 100_000},
    ),
    "gemini-2.5-flash-image-1290-image-tokens": ListCase(
        gemini,
        "gemini-2.5-flash-image",
        {
            "x_usage": {
                "promptTokenCount": 9,
                "candidatesTokenCount": 1_290,
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1_290}],
            }
        },
        {"input_tokens": 9, "output_tokens": 1_290, "output_image_tokens": 1_290},
        "google",
        {"outputTokens": 1_290, "outputImageTokens": 1_290},
    ),
    "gemini-2.5-pro-grounding": ListCase(
        gemini,
        "gemini-2.5-pro",
        {
            "x_usage": {"promptTokenCount": 20, "candidatesTokenCount": 150},
            "x_search_queries": ["weather hanoi", "weather hanoi tomorrow"],
        },
        {"input_tokens": 20, "output_tokens": 150, "web_searches": 1},  # per grounded prompt
        "google",
        {"webSearchRequests": 1},
    ),
    "gpt-5-priority-stream": ListCase(
        chat,
        "gpt-5",
        {"x_service_tier": "priority", "x_chunks": 40, "service_tier": "priority"},
        {"input_tokens": PROMPT, "output_tokens": 40},
        "openai",
        {"serviceTier": "priority"},
        stream=True,
        price_context={"service_tier": "priority"},
    ),
}


def genai_charge(case: ListCase) -> Decimal:
    calculated = genai_prices.calc_price(
        genai_prices.Usage(**case.usage),
        case.model,
        provider_id=case.provider,
        price_context=case.price_context,
    )
    return money.quantize(calculated.total_price * MULTIPLIER)


def one_log(store: Store, user_id: str) -> Document:
    (log,) = wait_logs(store, user_id, 1)
    assert log["usageSource"] == "reported" and log["statusCode"] == 200
    return log


@pytest.mark.parametrize("name", list(LIST_CASES))
def test_list_price_is_genai_prices_calculation(
    priced_proxy: Proxy, priced_store: Store, priced_accounts: Accounts, name: str
) -> None:
    case = LIST_CASES[name]
    account = priced_accounts.new(creditsNew="50")
    case.send(priced_proxy, account.key, case.model, case.stream, **case.extra)
    log = one_log(priced_store, account.user_id)
    expected = genai_charge(case)
    print(f"{name}: charged {log['creditsCost']} USD, genai-prices x {MULTIPLIER} {expected} USD")
    assert log["creditsCost"] == expected
    assert {key: log.get(key) for key in case.logged} == case.logged
    assert log["routeMultiplier"] == str(MULTIPLIER)


def usd(per_million: Decimal | int, fees: Decimal | int = 0) -> Decimal:
    """Σ tokens x USD-per-million rates, plus fees in USD, at the route's multiplier."""
    return money.quantize((Decimal(per_million) / 1_000_000 + fees) * MULTIPLIER)


OWN_CASES: dict[str, tuple[Send, dict[str, Any], Decimal]] = {
    # (request, its knobs, the charge from the config's rates by hand)
    "tier-not-crossed-at-its-threshold": (
        chat,
        {"x_usage": {"prompt_tokens": 100_000, "completion_tokens": 1_000}},
        usd(100_000 * 2 + 1_000 * 8),
    ),
    "tier-crossed": (
        chat,
        {"x_usage": {"prompt_tokens": 150_000, "completion_tokens": 1_000}},
        usd(150_000 * 4 + 1_000 * 12),
    ),
    "tier-counts-the-cached-prompt": (
        chat,
        {"x_cache_read": 30_000, "x_usage": {"prompt_tokens": 120_000, "completion_tokens": 100}},
        usd(90_000 * 4 + 30_000 * Decimal("0.4") + 100 * 12),
    ),
    "audio-in-and-out": (
        chat,
        {
            "x_usage": {
                "prompt_tokens": 10_000,
                "prompt_tokens_details": {"audio_tokens": 4_000},
                "completion_tokens": 500,
                "completion_tokens_details": {"audio_tokens": 200},
            }
        },
        usd(6_000 * 2 + 4_000 * 16 + 300 * 8 + 200 * 32),
    ),
    "image-in-and-out": (
        gemini,
        {
            "x_usage": {
                "promptTokenCount": 3_000,
                "promptTokensDetails": [
                    {"modality": "TEXT", "tokenCount": 2_000},
                    {"modality": "IMAGE", "tokenCount": 1_000},
                ],
                "candidatesTokenCount": 1_300,
                "candidatesTokensDetails": [
                    {"modality": "TEXT", "tokenCount": 10},
                    {"modality": "IMAGE", "tokenCount": 1_290},
                ],
            }
        },
        usd(2_000 * 2 + 1_000 * 4 + 10 * 8 + 1_290 * 40),
    ),
    "web-search-fee": (
        messages,
        {"x_chunks": 5, "x_usage": {"server_tool_use": {"web_search_requests": 3}}},
        usd(PROMPT * 2 + 5 * 8, 3 * Decimal("0.01")),
    ),
    "grounding-fee": (
        gemini,
        {"x_usage": {"promptTokenCount": 50, "candidatesTokenCount": 5}, "x_search_queries": ["q"]},
        usd(50 * 2 + 5 * 8, Decimal("0.01")),
    ),
    "priority-service-tier": (
        chat,
        {"x_chunks": 10, "x_service_tier": "priority"},
        usd(PROMPT * Decimal("3.5") + 10 * 14),
    ),
    "flex-is-not-configured-so-standard": (
        chat,
        {"x_chunks": 10, "x_service_tier": "flex"},
        usd(PROMPT * 2 + 10 * 8),
    ),
}


@pytest.mark.parametrize("name", list(OWN_CASES))
def test_operator_model_is_charged_by_its_config(
    priced_proxy: Proxy, priced_store: Store, priced_accounts: Accounts, name: str
) -> None:
    send, extra, expected = OWN_CASES[name]
    account = priced_accounts.new(creditsNew="50")
    send(priced_proxy, account.key, "acme-omni", **extra)
    log = one_log(priced_store, account.user_id)
    assert log["model"] == "acme-omni"
    assert log["creditsCost"] == expected, f"{name}: {log['creditsCost']} != {expected}"


def test_operator_override_of_a_list_price_keeps_its_structure(
    priced_proxy: Proxy, priced_store: Store, priced_accounts: Accounts
) -> None:
    account = priced_accounts.new(creditsNew="50")
    usage = {"input_tokens": 500_000, "output_tokens": 1_000}
    messages(priced_proxy, account.key, "my-sonnet", x_usage=usage)
    log = one_log(priced_store, account.user_id)
    # claude-sonnet-4-5's long-context input rate ($6 above 200k), the operator's flat output
    assert log["creditsCost"] == usd(500_000 * 6 + 1_000 * 12)


def test_reprice_over_the_proxy_logs_shows_no_difference(
    priced_proxy: Proxy, priced_store: Store, priced_accounts: Accounts
) -> None:
    account = priced_accounts.new(creditsNew="5")
    chat(priced_proxy, account.key, "acme-omni", x_chunks=3)  # at least one log to reprice
    one_log(priced_store, account.user_id)
    db = ["--db", priced_proxy.db_url, "--config", str(priced_proxy.config_path)]
    result = CliRunner().invoke(cli, [*db, "reprice", "--period", "all", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert rows and sum(row["requests"] for row in rows) >= 1
    for row in rows:
        assert Decimal(row["difference"]) == 0, row
        assert row["unpriced"] == 0, row


def test_a_prompt_estimated_past_a_tier_is_held_at_the_tier_rate(
    priced_proxy: Proxy, priced_store: Store, priced_accounts: Accounts, priced_config: Config
) -> None:
    """acme-omni doubles its input rate above 100k prompt tokens: a balance between the two
    holds admits a prompt estimated just under the tier and refuses one just over it."""

    def body(words: int) -> dict[str, Any]:
        prompt = {"role": "user", "content": "a " * words}
        return {"model": "acme-omni", "messages": [prompt], "max_tokens": 1}

    def estimated(words: int) -> int:
        return estimate_request("openai.chat", body(words), priced_config).held_input_tokens

    low, high = 1, 200_000  # the fewest words whose prompt is estimated past 100,000 tokens
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if estimated(middle) <= 100_000 else (low, middle)
    quote = resolve_price(priced_config, "acme-omni", MULTIPLIER)
    under, over = (
        estimate_request("openai.chat", body(words), priced_config) for words in (low - 1, low)
    )
    under_hold, over_hold = hold_amounts(under, quote), hold_amounts(over, quote)
    assert over_hold[1] > 2 * under_hold[1] * Decimal("0.99")  # the minimum, input alone
    balance = (under_hold[0] + over_hold[1]) / 2
    account = priced_accounts.new(creditsNew=str(balance))
    client = oa(priced_proxy, account.key, HOST)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(**body(low))
    assert refused.value.status_code == 402
    assert client.chat.completions.create(**body(low - 1))
