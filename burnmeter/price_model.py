"""How a model is billed, in genai-prices' own structure, and what a usage record costs under it.

A ``Price`` is a genai-prices ``ModelPrice`` per service tier: a rate per usage class
(input, output, cache reads and writes, audio and image tokens in and out, per-use fees for
server tools), each flat or tiered by the size of the whole prompt (cached parts included).
List prices come from genai-prices as they are; the config's model entries are built into
the same structure (``build``), optionally on top of a list price. ``amount`` then runs
genai-prices' own calculation, so one calculation prices every request, and a config entry
that cannot be priced (a rate without the rates it refines) is refused when the config loads.

Config rates are USD per million tokens; tool fees are USD per use (genai-prices keeps them
per thousand).
"""

from __future__ import annotations

import decimal
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache

from genai_prices import Usage
from genai_prices import data_snapshot
from genai_prices.types import ModelInfo
from genai_prices.types import ModelPrice
from genai_prices.types import Tier
from genai_prices.types import TieredPrices
from genai_prices.types import calc_unit_price
from genai_prices.units import _get_registry
from genai_prices.validation import validate_model_price

from burnmeter.exceptions import PriceError
from burnmeter.records import UsageRecord

RateValue = Decimal | TieredPrices

RATE_KEYS: dict[str, tuple[str, int]] = {
    # config key: (genai-prices price key, genai-prices units per config unit)
    "input": ("input_mtok", 1),
    "output": ("output_mtok", 1),
    "cache_read": ("cache_read_mtok", 1),
    "cache_write": ("cache_write_mtok", 1),
    "cache_write_1h": ("cache_write_1h_mtok", 1),
    "input_audio": ("input_audio_mtok", 1),
    "cache_audio_read": ("cache_audio_read_mtok", 1),
    "output_audio": ("output_audio_mtok", 1),
    "input_image": ("input_image_mtok", 1),
    "cache_image_read": ("cache_image_read_mtok", 1),
    "output_image": ("output_image_mtok", 1),
    "web_search": ("web_searches_kcount", 1000),
    "code_execution": ("code_executions_kcount", 1000),
}
"""Every rate a config entry can name."""

ONE_HOUR_WRITE_FACTOR = Decimal(2)
"""Anthropic's rate for 1-hour cache writes, relative to input (5-minute writes are 1.25x)."""

_CACHE_DEFAULTS = (  # (price key, the key whose rate it defaults to, factor)
    ("cache_read_mtok", "input_mtok", Decimal(1)),
    ("cache_write_mtok", "input_mtok", Decimal(1)),
    ("cache_write_1h_mtok", "input_mtok", ONE_HOUR_WRITE_FACTOR),
)
# A modality's cached tokens refine both the modality and the cache class: genai-prices wants
# a rate for each pair once both are priced. Left out, it is the modality's input rate (never
# a discount nobody configured), twice that for 1-hour writes.
_MODALITY_CACHE_DEFAULTS = tuple(
    (f"cache_{modality}_{kind}_mtok", cache_key, f"input_{modality}_mtok", factor)
    for modality in ("audio", "image")
    for kind, cache_key, factor in (
        ("read", "cache_read_mtok", Decimal(1)),
        ("write", "cache_write_mtok", Decimal(1)),
        ("write_1h", "cache_write_1h_mtok", ONE_HOUR_WRITE_FACTOR),
    )
)

_EXACT = decimal.Context(prec=60)
"""Enough digits that counts times rates never round before the one final rounding."""


@dataclass(frozen=True, slots=True)
class Price:
    """What a model bills: genai-prices rates, standard and per granted service tier."""

    standard: ModelPrice
    service_tiers: Mapping[str, ModelPrice] = field(default_factory=dict)
    counted: Mapping[str | None, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    """The usage keys each tier's rates read (the standard rates: None). ``amount`` hands
    genai-prices just these, each explicitly: it then neither scans its whole unit registry
    nor infers a count left out."""

    def __post_init__(self) -> None:
        tiers: dict[str | None, ModelPrice] = {None: self.standard}
        tiers.update(self.service_tiers)
        counted = {name: _usage_keys(price) for name, price in tiers.items()}
        object.__setattr__(self, "counted", counted)

    def billed(self, service_tier: str | None) -> ModelPrice:
        """The rates a request is billed at: its granted tier's, else the standard ones."""
        if service_tier is None:
            return self.standard
        return self.service_tiers.get(service_tier, self.standard)

    def rate(self, config_key: str, service_tier: str | None = None) -> RateValue | None:
        price_key, per = RATE_KEYS[config_key]
        value = getattr(self.billed(service_tier), price_key)
        return _scaled(value, Decimal(1) / per) if value is not None else None


@dataclass(frozen=True, slots=True)
class Rates:
    """A config table's rates: flat rates by config key and tiers of replacements above a size."""

    flat: Mapping[str, Decimal]
    tiers: Sequence[tuple[int, Mapping[str, Decimal]]] = ()


def find_list_model(model_name: str, upstream_url: str | None = None) -> ModelInfo | None:
    """genai-prices' entry for a model, or None if it does not know it.

    Tries the provider of ``upstream_url``, then the provider genai-prices infers from the
    name, then a ``provider/model`` name split in two.
    """
    return _find_list_model(model_name, upstream_url)


@lru_cache(maxsize=4096)  # model names come from clients: bounded
def _find_list_model(model_name: str, upstream_url: str | None) -> ModelInfo | None:
    snapshot = data_snapshot.get_snapshot()
    attempts: list[tuple[str, str | None, str | None]] = []
    if upstream_url:
        attempts.append((model_name, None, upstream_url))
    attempts.append((model_name, None, None))
    provider_id, slash, bare_name = model_name.partition("/")
    if slash:
        attempts.append((bare_name, provider_id, None))
    for ref, provider, url in attempts:
        try:
            _, model = snapshot.find_provider_model(ref, None, provider, url)
        except LookupError:
            continue
        if getattr(model.get_prices(datetime.now().astimezone()), "input_mtok", None) is None:
            continue  # priced by the request or the second, not by the token
        return model
    return None


def list_price(model: ModelInfo, at: datetime) -> Price:
    """genai-prices' price of ``model`` at ``at``, with each service tier it lists."""
    tiers = {
        variant.when["service_tier"]
        for variant in model.price_variants or ()
        if set(variant.when) == {"service_tier"}
    }
    return Price(
        model.get_prices(at),
        {tier: model.get_prices(at, {"service_tier": tier}) for tier in sorted(tiers)},
    )


def build(
    standard: Rates,
    service_tiers: Mapping[str, Rates],
    inherited: Price | None = None,
) -> Price:
    """An operator's price: the rates named, over ``inherited``'s where they name none.

    Without ``inherited``, cache rates left out default as the module says. A service tier's
    rates replace the ones it names (tiers included), on top of the standard ones.
    Raises ``PriceError`` for a structure genai-prices cannot price.
    """
    base: dict[str, RateValue] = dict(inherited.standard.__dict__) if inherited else {}
    base.update(_genai_rates(standard))
    if inherited is None:
        _fill_defaults(base, _CACHE_DEFAULTS)
    _fill_modality_defaults(base)
    prices = {"standard": base}
    names = set(service_tiers) | set(inherited.service_tiers if inherited else ())
    for name in sorted(names):
        tier = dict(base)
        if inherited and name in inherited.service_tiers:
            tier.update(_overrides(inherited.service_tiers[name], inherited.standard))
        if name in service_tiers:
            tier.update(_genai_rates(service_tiers[name]))
        _fill_modality_defaults(tier)
        prices[name] = tier
    for name, rates in prices.items():
        keys = {key for key, value in rates.items() if value is not None}
        try:
            validate_model_price(keys, _get_registry())
        except ValueError as e:
            where = "" if name == "standard" else f"service tier {name!r}: "
            raise PriceError(f"{where}{_config_names(str(e))}") from None
    model_prices = {name: ModelPrice(**rates) for name, rates in prices.items()}
    standard_price = model_prices.pop("standard")
    return Price(standard_price, model_prices)


def amount(price: Price, usage: UsageRecord) -> Decimal:
    """USD of ``usage`` at ``price`` (genai-prices' calculation), exact and unrounded."""
    return amounts(price, usage)[0]


def amounts(price: Price, usage: UsageRecord) -> tuple[Decimal, Decimal]:
    """(``amount``, the part of it its input classes make), from one calculation."""
    tier = usage.service_tier if usage.service_tier in price.service_tiers else None
    counts = genai_usage(usage)
    with decimal.localcontext(_EXACT):
        try:
            read = Usage(**{key: counts.get(key, 0) for key in price.counted[tier]})
            calculated = price.billed(tier).calc_price(read)
        except ValueError as e:  # a record that breaks its own invariants
            raise PriceError(str(e)) from None
    return calculated["total_price"], calculated["input_price"]


def genai_usage(usage: UsageRecord) -> dict[str, int]:
    """``usage`` in genai-prices' terms: a class's count includes the classes that refine it
    (``input_tokens`` is the whole prompt, ``input_audio_tokens`` includes cached audio)."""
    usage = usage.clamped()
    return {
        "input_tokens": usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_5m_tokens": usage.cache_write_tokens - usage.cache_write_1h_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
        # no provider writes audio or images to a cache: said, as genai-prices cannot infer it
        "cache_audio_write_tokens": 0,
        "cache_audio_write_5m_tokens": 0,
        "cache_audio_write_1h_tokens": 0,
        "cache_image_write_tokens": 0,
        "cache_image_write_5m_tokens": 0,
        "cache_image_write_1h_tokens": 0,
        "input_audio_tokens": usage.input_audio_tokens + usage.cache_audio_read_tokens,
        "cache_audio_read_tokens": usage.cache_audio_read_tokens,
        "input_image_tokens": usage.input_image_tokens + usage.cache_image_read_tokens,
        "cache_image_read_tokens": usage.cache_image_read_tokens,
        "output_tokens": usage.output_tokens,
        "output_reasoning_tokens": min(usage.reasoning_tokens, usage.output_tokens),
        "output_audio_tokens": usage.output_audio_tokens,
        "output_image_tokens": usage.output_image_tokens,
        "web_searches": usage.web_search_requests,
        "code_executions": usage.code_executions,
    }


def _usage_keys(price: ModelPrice) -> tuple[str, ...]:
    registry = _get_registry()
    keys = {
        registry.unit_for_price_key(key).usage_key
        for key, value in price.__dict__.items()
        if value is not None and key in registry._all_price_keys
    }
    return tuple(sorted((keys - {"requests"}) | {"input_tokens"}))  # requests: always one


def applicable_rate(value: RateValue, prompt_tokens: int) -> Decimal:
    """The rate a whole prompt of ``prompt_tokens`` pays (its tier's, as genai-prices picks it)."""
    return calc_unit_price(value, 1, prompt_tokens, 1)


def _genai_rates(rates: Rates) -> dict[str, RateValue]:
    """Config rates (flat, then replaced above each tier's size) as genai-prices rates."""
    out: dict[str, RateValue] = {}
    for key, flat in rates.flat.items():
        price_key, per = RATE_KEYS[key]
        tiers = [Tier(above, tier[key] * per) for above, tier in rates.tiers if key in tier]
        out[price_key] = TieredPrices(flat * per, tiers) if tiers else flat * per
    return out


def _overrides(variant: ModelPrice, standard: ModelPrice) -> dict[str, RateValue]:
    """The rates a list price's service tier changes."""
    return {
        key: value
        for key, value in variant.__dict__.items()
        if value is not None and standard.__dict__.get(key) != value
    }


def _fill_defaults(
    rates: dict[str, RateValue], defaults: Sequence[tuple[str, str, Decimal]]
) -> None:
    for key, source, factor in defaults:
        if rates.get(key) is None and (value := rates.get(source)) is not None:
            rates[key] = _scaled(value, factor)


def _fill_modality_defaults(rates: dict[str, RateValue]) -> None:
    for key, cache_key, source, factor in _MODALITY_CACHE_DEFAULTS:
        if rates.get(key) is None and rates.get(cache_key) is not None:
            if (value := rates.get(source)) is not None:
                rates[key] = _scaled(value, factor)


def _scaled(value: RateValue, factor: Decimal) -> RateValue:
    if isinstance(value, TieredPrices):
        tiers = [Tier(tier.start, tier.price * factor) for tier in value.tiers]
        return TieredPrices(value.base * factor, tiers)
    return value * factor


def _config_names(message: str) -> str:
    """genai-prices' message with the config's key names."""
    for key, (price_key, _) in sorted(RATE_KEYS.items(), key=lambda kv: -len(kv[1][0])):
        message = message.replace(price_key, key)
    usage_names = {"input_tokens": "input", "output_tokens": "output"}
    for usage_key, key in usage_names.items():
        message = message.replace(usage_key, key)
    return message
