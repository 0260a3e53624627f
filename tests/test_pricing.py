import re
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burnmeter import price_model
from burnmeter.builtin import COMMON_MODELS
from burnmeter.config import Config
from burnmeter.config import DefaultPrice
from burnmeter.config import default_config
from burnmeter.config import load_config
from burnmeter.config import parse_config
from burnmeter.exceptions import UnknownModelError
from burnmeter.price_model import Price
from burnmeter.pricing import PriceQuote
from burnmeter.pricing import billing_tokens
from burnmeter.pricing import cost
from burnmeter.pricing import list_price
from burnmeter.pricing import resolve_price
from burnmeter.records import UsageRecord
from burnmeter.usage import normalise

ONE = Decimal(1)
SONNET = {
    "aliases": ["claude-sonnet-4-5"],
    "input": 3,
    "output": 14,
    "cache_write": 3.75,
    "cache_read": 0.3,
}


def make_config(**overrides: object) -> Config:
    data: dict[str, object] = {"models": {"claude-sonnet-4-5-20250929": SONNET}}
    data.update(overrides)
    return parse_config(data)


def quote(input: str, output: str, multiplier: str = "1", **rates: str) -> PriceQuote:
    price = DefaultPrice.model_validate({"input": input, "output": output, **rates}).price
    return PriceQuote("m", price, Decimal(multiplier), "config")


TOKEN_RATES = ("input", "output", "cache_write", "cache_write_1h", "cache_read")


def token_rates(price: Price | None) -> tuple[object, ...]:
    """(input, output, cache write, 1-hour cache write, cache read) rates of ``price``."""
    assert price is not None
    return tuple(price.rate(key) for key in TOKEN_RATES)


def rates(*values: str) -> tuple[Decimal, ...]:
    return tuple(Decimal(value) for value in values)


def test_worked_example() -> None:
    q = resolve_price(make_config(), "claude-sonnet-4-5", Decimal("1.02"))
    usage = UsageRecord(
        input_tokens=1_000, output_tokens=500, cache_write_tokens=2_000, cache_read_tokens=10_000
    )
    assert q.model == "claude-sonnet-4-5-20250929"
    assert cost(usage, q) == Decimal("0.02091")
    assert billing_tokens(usage, q) == 5_100


def test_alias_and_id_resolve_to_the_same_model() -> None:
    config = make_config()
    by_id = resolve_price(config, "claude-sonnet-4-5-20250929", ONE)
    by_alias = resolve_price(config, "claude-sonnet-4-5", ONE)
    assert by_id == by_alias
    assert token_rates(by_id.price) == rates("3", "14", "3.75", "6", "0.3")
    assert by_id.source == "config"


def test_route_and_model_multipliers_multiply() -> None:
    config = make_config(models={"m": {"input": 1, "output": 2, "multiplier": 2}})
    q = resolve_price(config, "m", Decimal("1.15"))
    assert q.multiplier == Decimal("2.30")
    assert q.pool is None
    usage = UsageRecord(input_tokens=1_000_000, output_tokens=1_000_000)
    assert cost(usage, q) == Decimal("6.9")
    assert billing_tokens(usage, q) == 4_600_000


def normalised(api: str, raw: object) -> UsageRecord:
    usage = normalise(api, raw)
    assert usage is not None
    return usage


def test_openai_cached_tokens_are_not_billed_twice() -> None:
    # openai/chat-cached-tokens: prompt_tokens 1149 include cached_tokens 1024.
    raw = {
        "prompt_tokens": 1149,
        "completion_tokens": 353,
        "total_tokens": 1502,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    usage = normalised("openai.chat", raw)
    q = quote("2.5", "10", cache_read="1.25")
    assert cost(usage, q) == Decimal("0.0051225")  # (125·2.5 + 353·10 + 1024·1.25) / 1e6
    assert billing_tokens(usage, q) == 125 + 353 + 512


def test_anthropic_cache_reads_and_writes_at_their_own_rates() -> None:
    q = resolve_price(make_config(), "claude-sonnet-4-5", ONE)
    # anthropic/messages-cache-read: input_tokens 21 excludes cache_read_input_tokens 1733.
    read = normalised(
        "anthropic.messages",
        {
            "input_tokens": 21,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 1733,
            "output_tokens": 568,
        },
    )
    assert cost(read, q) == Decimal("0.0085349")  # (21·3 + 568·14 + 1733·0.3) / 1e6
    # anthropic/stream-cache-write: input 4, cache_creation_input_tokens 1165, output 201.
    write = normalised(
        "anthropic.messages",
        {"input_tokens": 4, "cache_creation_input_tokens": 1165, "output_tokens": 201},
    )
    assert cost(write, q) == Decimal("0.00719475")  # (4·3 + 201·14 + 1165·3.75) / 1e6


def test_gemini_thoughts_are_billed_as_output() -> None:
    # gemini/generate-cached-content: promptTokenCount 424 includes cachedContentTokenCount 287;
    # candidatesTokenCount 70 excludes thoughtsTokenCount 287.
    raw = {
        "promptTokenCount": 424,
        "candidatesTokenCount": 70,
        "totalTokenCount": 781,
        "cachedContentTokenCount": 287,
        "thoughtsTokenCount": 287,
    }
    usage = normalised("gemini.generate", raw)
    assert (usage.input_tokens, usage.output_tokens) == (137, 357)
    q = quote("0.3", "2.5", cache_read="0.03")
    assert cost(usage, q) == Decimal("0.00094221")  # (137·0.3 + 357·2.5 + 287·0.03) / 1e6


def test_one_hour_cache_writes_at_the_one_hour_rate() -> None:
    usage = UsageRecord(cache_write_tokens=3_000, cache_write_1h_tokens=1_000)
    configured = quote("3", "15", cache_write="3.75", cache_write_1h="6")
    assert cost(usage, configured) == Decimal("0.0135")  # (2000·3.75 + 1000·6) / 1e6
    assert billing_tokens(usage, configured) == 2_500 + 2_000
    # Not configured: 2x input.
    defaulted = quote("3", "15", cache_write="3.75")
    assert defaulted.price.rate("cache_write_1h") == Decimal(6)
    assert cost(usage, defaulted) == Decimal("0.0135")


def test_missing_cache_prices_are_never_free() -> None:
    price = resolve_price(make_config(models={"m": {"input": 2, "output": 8}}), "m", ONE).price
    assert token_rates(price) == rates("2", "8", "2", "4", "2")


def test_unknown_model_rejected_by_default() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'gpt-4o'"):
        resolve_price(make_config(), "gpt-4o", ONE)


def test_unknown_model_default_price() -> None:
    config = make_config(unknown_model="default", default_price={"input": 1, "output": 4})
    q = resolve_price(config, "mystery", Decimal("1.5"))
    assert q.source == "default"
    assert q.multiplier == Decimal("1.5")
    assert token_rates(q.price) == rates("1", "4", "1", "2", "1")
    assert cost(UsageRecord(input_tokens=1_000, output_tokens=1_000), q) == Decimal("0.0075")
    # Configured models still win over the default.
    assert resolve_price(config, "claude-sonnet-4-5", ONE).price.rate("input") == Decimal(3)


def test_unknown_model_list_price() -> None:
    config = make_config(unknown_model="list-price")
    q = resolve_price(config, "gpt-4o-2024-08-06", Decimal("1.15"))
    assert q.source == "list-price"
    assert q.multiplier == Decimal("1.15")
    # genai-prices has no cache-write price for OpenAI: writes are billed as input.
    assert token_rates(q.price) == (Decimal("2.5"), Decimal(10), None, None, Decimal("1.25"))
    write = UsageRecord(cache_write_tokens=1_000_000)
    assert cost(write, q) == Decimal("2.875")  # 2.5 x 1.15
    # Configured prices win over list prices.
    configured = resolve_price(config, "claude-sonnet-4-5-20250929", ONE)
    assert configured.price.rate("output") == Decimal(14)


def test_list_price_keeps_anthropic_cache_rates_and_long_context_tier() -> None:
    price = list_price("claude-sonnet-4-5-20250929")
    assert price is not None
    base = tuple(price_model.applicable_rate(rate, 200_000) for rate in token_rates(price))
    above = tuple(price_model.applicable_rate(rate, 200_001) for rate in token_rates(price))
    assert base == rates("3", "15", "3.75", "6", "0.3")
    assert above == rates("6", "22.5", "7.5", "12", "0.6")


def test_list_price_provider_from_name_or_upstream() -> None:
    assert list_price("openai/gpt-4o") == list_price("gpt-4o")
    assert list_price("llama-3.3-70b-versatile") is None
    groq = list_price("llama-3.3-70b-versatile", "https://api.groq.com/openai/v1/chat/completions")
    assert groq is not None
    assert (groq.rate("input"), groq.rate("output")) == rates("0.59", "0.79")


def test_list_price_unknown_to_genai_prices_is_rejected() -> None:
    config = make_config(unknown_model="list-price")
    with pytest.raises(UnknownModelError, match="no list price, and the config does not price it"):
        resolve_price(config, "no-such-model-xyz", ONE)


def test_rounding_happens_once() -> None:
    # 10,000 one-token requests at $3/M sum to exactly $0.03 (floats would drift).
    one = UsageRecord(input_tokens=1)
    q = quote("3", "15")
    assert sum((cost(one, q) for _ in range(10_000)), Decimal(0)) == Decimal("0.03")
    # Two half-nano parts: rounded separately they would make 2 nano-USD.
    tiny = quote("0.0005", "0.0005")
    assert cost(UsageRecord(input_tokens=1, output_tokens=1), tiny) == Decimal("0.000000001")
    # The multiplier applies before the rounding, not after.
    assert cost(one, quote("0.0004", "0", "1.3")) == Decimal("0.000000001")


def test_zero_usage_costs_nothing() -> None:
    q = resolve_price(make_config(), "claude-sonnet-4-5", Decimal("1.02"))
    assert cost(UsageRecord(), q) == 0
    assert billing_tokens(UsageRecord(), q) == 0


def test_billing_tokens_truncate() -> None:
    q = quote("3", "14", "1.02", cache_write="3.75", cache_read="0.3")
    assert billing_tokens(UsageRecord(input_tokens=99), q) == 100  # 100.98
    # 1/3 is not a finite decimal: dividing once, exactly, keeps 3 x 1/3 = 1.
    assert billing_tokens(UsageRecord(cache_read_tokens=3), quote("3", "1", cache_read="1")) == 1


def test_billing_tokens_with_free_input_use_the_original_weights() -> None:
    q = quote("0", "5", cache_write="1", cache_read="0.5")
    usage = UsageRecord(
        input_tokens=10, output_tokens=20, cache_write_tokens=30, cache_read_tokens=40
    )
    assert billing_tokens(usage, q) == 10 + 20 + 30 + 4


def test_a_record_whose_parts_exceed_their_wholes_is_priced_clamped() -> None:
    q = quote("1", "2", input_audio="10", output_image="20")
    hostile = UsageRecord(input_tokens=10, input_audio_tokens=50, output_image_tokens=7)
    # audio is at most the 10 input tokens; image output at most the 0 output tokens
    assert cost(hostile, q) == cost(UsageRecord(input_tokens=10, input_audio_tokens=10), q)
    assert hostile.clamped().output_image_tokens == 0
    fine = UsageRecord(input_tokens=10, input_audio_tokens=5)
    assert fine.clamped() is fine


@given(st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40))
def test_an_unknown_models_error_names_the_config_key_that_prices_it(name: str) -> None:
    with pytest.raises(UnknownModelError) as e:
        resolve_price(make_config(), name, ONE)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message
    key = re.search(r"\(\[models\.(\".*\")\] input, output\)$", message)
    assert key, message
    priced = tomllib.loads(f"[models.{key.group(1)}]\ninput = 1\noutput = 2\n")
    assert priced == {"models": {name: {"input": 1, "output": 2}}}


def test_the_built_in_config_prices_common_models_at_list_prices() -> None:
    config = default_config()
    for model_id, aliases in COMMON_MODELS.items():
        listed = list_price(model_id)
        assert listed is not None and listed.rate("input") and listed.rate("output")
        quote = resolve_price(config, model_id, ONE)
        assert (quote.price, quote.source) == (listed, "config")
        for alias in aliases:
            assert list_price(alias) == listed, alias  # an alias costs what its model does
            assert resolve_price(config, alias, ONE).model == model_id


def test_the_example_config_prices_at_list_prices() -> None:
    config = load_config(Path(__file__).parents[1] / "burnmeter.example.toml")
    assert config.models
    for model_id in config.models:
        quote = resolve_price(config, model_id, ONE)
        assert quote.price == list_price(model_id), model_id
