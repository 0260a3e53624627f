"""The price model: genai-prices' structure built from the config, priced by its calculation.

The corpus cases are priced as the proxy prices them and compared with genai-prices' own
extraction and calculation of the same responses; hypothesis checks that no usage count,
grown, makes a request cheaper (a client must never pad its way to a discount).
"""

from __future__ import annotations

import dataclasses
import warnings
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from genai_prices import data_snapshot
from genai_prices.types import TieredPrices
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from burnmeter import price_model
from burnmeter.config import DefaultPrice
from burnmeter.config import parse_config
from burnmeter.exceptions import PriceError
from burnmeter.exceptions import UnknownModelError
from burnmeter.price_model import Rates
from burnmeter.pricing import PriceQuote
from burnmeter.pricing import cost
from burnmeter.pricing import cost_and_input_cost
from burnmeter.pricing import list_price
from burnmeter.pricing import resolve_price
from burnmeter.records import UsageRecord
from tests.corpus import case_params
from tests.corpus import read_usage
from tests.test_usage_corpus import BILLED_EXTRAS

ONE = Decimal(1)
LIST_PRICES = parse_config({"unknown_model": "list-price"})

# genai-prices lists this OpenRouter model with no token rates; burnmeter never takes an
# unpriced model for free, and prices it as the model named after the provider prefix.
UNPRICED_BY_GENAI = {"openrouter/chat-stream-cached-reasoning"}
FLAVORS = {
    "openai.chat": "chat",
    "openai.responses": "responses",
    "openai.embeddings": "embeddings",
}


def request_model(case: dict[str, Any]) -> str:
    body = case["request"]["body"] or {}
    if isinstance(body.get("model"), str):
        return str(body["model"])
    return str(case["request"]["path"].split("models/")[1].split(":")[0])


def genai_usage_of(case: dict[str, Any], url: str, model: str) -> genai_prices.Usage:
    """genai-prices' own extraction of the case's usage object."""
    raw = case["raw_usage"]
    if "message_start" in raw or "message_delta" in raw:  # an Anthropic stream: merged
        delta = {k: v for k, v in (raw.get("message_delta") or {}).items() if v is not None}
        raw = {**(raw.get("message_start") or {}), **delta}
    if case["api"].startswith("gemini."):
        response = {"usageMetadata": raw, "modelVersion": model}
    else:
        response = {"usage": raw, "model": model}
    provider = data_snapshot.get_snapshot().find_provider(None, None, url)
    flavors = {extractor.api_flavor for extractor in provider.extractors or ()}
    flavor = FLAVORS.get(case["api"], "default")
    extracted = genai_prices.extract_usage(
        response, provider_api_url=url, api_flavor=flavor if flavor in flavors else "default"
    )
    return extracted.usage


@pytest.mark.parametrize(("name", "case"), case_params())
def test_corpus_is_priced_as_genai_prices_prices_it(name: str, case: dict[str, Any]) -> None:
    if case["expected_usage"] is None:
        pytest.skip("no usage to price")
    record = read_usage(case)
    assert record is not None
    model = request_model(case)
    url = f"https://{case['request']['host']}{case['request']['path']}"
    try:
        quote = resolve_price(LIST_PRICES, model, ONE, upstream_url=url)
    except UnknownModelError:
        with pytest.raises(LookupError):
            genai_prices.calc_price(genai_prices.Usage(), model, provider_api_url=url)
        return
    ours = cost(record, quote)

    usage = genai_usage_of(case, url, model)
    extras = BILLED_EXTRAS.get(name, {})
    # genai-prices' OpenAI extractor does not count Responses web_search_call items
    if extras.get("web_search_requests") and not usage.reported_value("web_searches"):
        usage.web_searches = extras["web_search_requests"]
    context = {"service_tier": extras["service_tier"]} if "service_tier" in extras else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = genai_prices.calc_price(usage, model, provider_api_url=url, price_context=context)
    if name in UNPRICED_BY_GENAI:
        assert theirs.total_price == 0 < ours
        return
    assert ours == theirs.total_price.quantize(Decimal("1e-9")), (ours, theirs.total_price)


# -- building prices from the config ---------------------------------------------------------
def built(**rates: Any) -> price_model.Price:
    return DefaultPrice.model_validate(rates).price


def test_a_modality_with_cache_rates_gets_its_cached_rates_from_its_input_rate() -> None:
    price = built(input=1, output=2, cache_read="0.1", input_audio=8)
    # genai-prices wants a rate for cached audio once audio and cache reads are both priced
    assert price.rate("cache_audio_read") == Decimal(8)
    usage = UsageRecord(input_tokens=100, input_audio_tokens=40, cache_audio_read_tokens=10)
    usage = dataclasses.replace(usage, cache_read_tokens=30)
    # text 60 x 1 + audio 40 x 8 + cached text 20 x 0.1 + cached audio 10 x 8
    assert price_model.amount(price, usage) * 1_000_000 == 60 + 320 + 2 + 80


def test_tiers_pick_the_rate_of_the_whole_prompt_cached_parts_included() -> None:
    price = built(
        input=1, output=2, cache_read="0.5", tiers=[{"above": 1_000, "input": 3, "cache_read": 1}]
    )
    below = UsageRecord(input_tokens=600, cache_read_tokens=400, output_tokens=10)
    above = dataclasses.replace(below, cache_read_tokens=401)
    assert price_model.amount(price, below) * 1_000_000 == 600 * 1 + 400 * Decimal("0.5") + 20
    assert price_model.amount(price, above) * 1_000_000 == 600 * 3 + 401 * 1 + 20


def test_a_service_tier_replaces_the_rates_it_names_and_keeps_the_others() -> None:
    price = built(input=1, output=2, web_search="0.01", service_tiers={"flex": {"input": "0.5"}})
    usage = UsageRecord(input_tokens=1_000_000, output_tokens=1_000_000, web_search_requests=2)
    assert price_model.amount(price, usage) == Decimal("3.02")
    flex = dataclasses.replace(usage, service_tier="flex")
    assert price_model.amount(price, flex) == Decimal("2.52")
    unknown_tier = dataclasses.replace(usage, service_tier="scale")
    assert price_model.amount(price, unknown_tier) == Decimal("3.02")


def test_an_operator_entry_inherits_a_list_price_and_its_service_tiers() -> None:
    config = parse_config({"models": {"mine": {"list_price": "gpt-5", "input": "1.0"}}})
    price = resolve_price(config, "mine", ONE).price
    listed = list_price("gpt-5")
    assert listed is not None
    assert price.rate("input") == Decimal(1)
    assert price.rate("output") == listed.rate("output")
    assert set(price.service_tiers) == set(listed.service_tiers)
    # the list's priority rates stay unless the operator names them
    assert price.rate("input", "priority") == listed.rate("input", "priority")


def test_a_structure_genai_prices_cannot_price_is_refused() -> None:
    with pytest.raises(PriceError, match="cache_audio_read"):
        price_model.build(Rates({"cache_audio_read": ONE, "cache_read": ONE}), {})


# -- no count, grown, lowers the cost ----------------------------------------------------------
OPERATOR = DefaultPrice.model_validate(
    {
        "input": 2,
        "output": 8,
        "cache_read": "0.2",
        "cache_write": "2.5",
        "input_audio": 16,
        "output_audio": 32,
        "input_image": 4,
        "output_image": 40,
        "web_search": "0.01",
        "code_execution": "0.03",
        "tiers": [
            {"above": 1_000, "input": 4, "output": 12, "cache_read": "0.4"},
            {"above": 5_000, "input": 6, "output": 12, "input_audio": 20},
        ],
        "service_tiers": {"priority": {"input": "3.5", "output": 14}},
    }
).price
RICH_KEYS = {  # list prices with more than input and output: tiers, modalities, fees
    key
    for key, (price_key, _) in price_model.RATE_KEYS.items()
    if key not in ("input", "output", "cache_read")
}


def rich_list_prices() -> dict[str, price_model.Price]:
    found: dict[str, price_model.Price] = {}
    for provider in data_snapshot.get_snapshot().providers:
        for model in provider.models:
            price = price_model.list_price(model, datetime.now(UTC))
            standard = price.standard
            tiered = any(isinstance(v, TieredPrices) for v in standard.__dict__.values())
            rich = any(price.rate(key) is not None for key in RICH_KEYS)
            if (tiered or rich or price.service_tiers) and price.rate("input") is not None:
                found[f"{provider.id}/{model.id}"] = price
    return found


PRICES = {"operator": OPERATOR, **rich_list_prices()}
# disjoint classes: a record is built from them, so growing one grows its wholes too
CLASSES = (
    "text_in",
    "audio_in",
    "image_in",
    "cache_read_text",
    "cache_read_audio",
    "cache_write_5m",
    "cache_write_1h",
    "text_out",
    "audio_out",
    "image_out",
    "web_searches",
    "code_executions",
    "reasoning",
)


def record_of(counts: dict[str, int], tier: str | None) -> UsageRecord:
    return UsageRecord(
        input_tokens=counts["text_in"] + counts["audio_in"] + counts["image_in"],
        input_audio_tokens=counts["audio_in"],
        input_image_tokens=counts["image_in"],
        cache_read_tokens=counts["cache_read_text"] + counts["cache_read_audio"],
        cache_audio_read_tokens=counts["cache_read_audio"],
        cache_write_tokens=counts["cache_write_5m"] + counts["cache_write_1h"],
        cache_write_1h_tokens=counts["cache_write_1h"],
        output_tokens=counts["text_out"]
        + counts["audio_out"]
        + counts["image_out"]
        + counts["reasoning"],
        reasoning_tokens=counts["reasoning"],
        output_audio_tokens=counts["audio_out"],
        output_image_tokens=counts["image_out"],
        web_search_requests=counts["web_searches"],
        code_executions=counts["code_executions"],
        service_tier=tier,
    )


@settings(max_examples=500, deadline=None)
@given(
    price=st.sampled_from(sorted(PRICES)),
    counts=st.fixed_dictionaries({name: st.integers(0, 300_000) for name in CLASSES}),
    grown=st.sampled_from(CLASSES),
    by=st.integers(1, 300_000),
    tier=st.sampled_from([None, "priority", "flex", "default"]),
)
def test_cost_never_decreases_when_a_count_grows(
    price: str, counts: dict[str, int], grown: str, by: int, tier: str | None
) -> None:
    quote = PriceQuote("m", PRICES[price], Decimal("1.02"), "config")
    before = cost(record_of(counts, tier), quote)
    after = cost(record_of({**counts, grown: counts[grown] + by}, tier), quote)
    assert after >= before >= 0


@settings(max_examples=300, deadline=None)
@given(
    price=st.sampled_from(sorted(PRICES)),
    counts=st.fixed_dictionaries({name: st.integers(0, 300_000) for name in CLASSES}),
    tier=st.sampled_from([None, "priority", "flex"]),
)
def test_amount_is_genai_prices_calculation_of_the_whole_usage(
    price: str, counts: dict[str, int], tier: str | None
) -> None:
    """``amount`` tells genai-prices only the counts a price reads: the same calculation."""
    record = record_of(counts, tier)
    rates = PRICES[price].billed(tier)
    whole = genai_prices.Usage(**price_model.genai_usage(record))
    assert price_model.amount(PRICES[price], record) == rates.calc_price(whole)["total_price"]


@settings(max_examples=200, deadline=None)
@given(
    price=st.sampled_from(sorted(PRICES)),
    counts=st.fixed_dictionaries({name: st.integers(0, 300_000) for name in CLASSES}),
    tier=st.sampled_from([None, "priority", "flex"]),
)
def test_the_input_part_of_a_cost_is_what_the_input_alone_costs(
    price: str, counts: dict[str, int], tier: str | None
) -> None:
    """What a hold's minimum relies on: one calculation gives both."""
    quote = PriceQuote("m", PRICES[price], Decimal("1.15"), "config")
    outputs = ("text_out", "audio_out", "image_out", "reasoning", "web_searches", "code_executions")
    prompt_only = record_of({**counts, **dict.fromkeys(outputs, 0)}, tier)
    total, input_part = cost_and_input_cost(record_of(counts, tier), quote)
    per_request = PRICES[price].billed(tier).requests_kcount is not None
    assert input_part == cost(prompt_only, quote) or per_request
    assert input_part <= total
