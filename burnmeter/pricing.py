"""Prices and costs (``docs/routing.md``, "Prices").

``resolve_price`` turns a requested model name into a ``PriceQuote`` under the config's
unknown-model policy; ``cost`` and ``billing_tokens`` price a normalised ``UsageRecord``.
How a model is billed (tiers, modalities, tool fees, service tiers) and the calculation
itself, genai-prices' own, are in ``burnmeter.price_model``.

Cache prices an operator leaves out are never free:

- ``cache_read`` defaults to the input price (no discount assumed);
- ``cache_write`` defaults to the input price;
- ``cache_write_1h`` defaults to 2x the input price, Anthropic's rate for 1-hour writes
  (5-minute writes are 1.25x, and are what ``cache_write`` prices).
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Literal

from burnmeter import money
from burnmeter import price_model
from burnmeter.config import Config
from burnmeter.exceptions import UnknownModelError
from burnmeter.price_model import Price
from burnmeter.records import UsageRecord

PriceSource = Literal["config", "default", "list-price"]

# The original's billing-token weights when a model's input price is 0 (docs/routing.md).
FREE_INPUT_CACHE_WRITE_WEIGHT = Decimal(1)
FREE_INPUT_CACHE_READ_WEIGHT = Decimal("0.1")
# Enough digits that token counts times prices never round before the final quantize.
_EXACT = decimal.Context(prec=60)


@dataclass(frozen=True, slots=True)
class PriceQuote:
    """How one request is priced: the rate, the combined multiplier, and where they came from."""

    model: str
    """The configured model id an alias resolved to, or the requested name."""
    price: Price
    multiplier: Decimal
    source: PriceSource
    pool: str | None = None
    """The model's pool override, if the config sets one."""
    route_multiplier: Decimal = Decimal(1)
    """The route's part of ``multiplier`` (logged: a log can be repriced with it)."""


def resolve_price(
    config: Config,
    model_name: str,
    route_multiplier: Decimal,
    *,
    upstream_url: str | None = None,
) -> PriceQuote:
    """Price a model by id or alias; unknown models follow ``config.unknown_model``.

    ``route_multiplier`` is the called route's, unless the model bills a pool of its own:
    then its ``route_multiplier``, or the dearest of the routes that bill that pool.

    ``upstream_url`` (where the request goes) helps the list-price policy pick the provider.
    Raises ``UnknownModelError`` when the model has no price.
    """
    if found := config.model(model_name):
        model_id, model = found
        if model.pool is not None:
            # the pool it bills brings its own multiplier, never the called host's cheaper one
            route_multiplier = model.route_multiplier or config.pool_multiplier(model.pool)
        multiplier = route_multiplier * model.multiplier
        return PriceQuote(model_id, model.price, multiplier, "config", model.pool, route_multiplier)
    if config.unknown_model == "default":
        default = config.default_price
        assert default is not None  # the config validator requires it for this policy
        return PriceQuote(
            model_name, default.price, route_multiplier, "default", None, route_multiplier
        )
    if config.unknown_model == "list-price":
        if listed := list_price(model_name, upstream_url):
            return PriceQuote(
                model_name, listed, route_multiplier, "list-price", None, route_multiplier
            )
        raise UnknownModelError(
            f"unknown model {model_name!r}: no list price, and the config does not price it"
            f" ({_price_key(model_name)})"
        )
    raise UnknownModelError(
        f"unknown model {model_name!r}: the config does not price it ({_price_key(model_name)})"
    )


def _price_key(model_name: str) -> str:
    """The config table that would price ``model_name``, as TOML spells its key (a basic
    string: quotes, backslashes and control characters escaped, so it stays one line)."""
    escaped = "".join(
        f"\\u{ord(c):04x}" if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F else c
        for c in model_name
    )
    return f'[models."{escaped}"] input, output'


def list_price(model_name: str, upstream_url: str | None = None) -> Price | None:
    """genai-prices' current list price, or None if it does not know the model.

    Only the URL up to its path counts for finding the provider (the query may hold a key).
    """
    origin = upstream_url.partition("?")[0] if upstream_url else None
    minute = datetime.now(UTC).replace(second=0, microsecond=0)
    return _list_price_at(model_name, origin, minute)


@lru_cache(maxsize=4096)  # model names come from clients: bounded
def _list_price_at(model_name: str, origin: str | None, minute: datetime) -> Price | None:
    """The list price as of ``minute`` (list prices change by date or time of day, in whole
    minutes: built once a minute, not once a request)."""
    listed = price_model.find_list_model(model_name, origin)
    return price_model.list_price(listed, minute) if listed else None


def cost(usage: UsageRecord, quote: PriceQuote) -> Decimal:
    """USD for ``usage``: exact, rounded once to ``money.PRECISION``."""
    listed = price_model.amount(quote.price, usage)
    with decimal.localcontext(_EXACT):
        return money.quantize(listed * quote.multiplier)


def cost_and_input_cost(usage: UsageRecord, quote: PriceQuote) -> tuple[Decimal, Decimal]:
    """``cost``, and what the input classes alone cost (each rounded once), in one
    calculation: the input's tier depends on the input alone, so the input part is what
    the input would cost without the output and tool uses."""
    listed, input_part = price_model.amounts(quote.price, usage)
    with decimal.localcontext(_EXACT):
        return money.quantize(listed * quote.multiplier), money.quantize(
            input_part * quote.multiplier
        )


def billing_tokens(usage: UsageRecord, quote: PriceQuote) -> int:
    """The original's ``tokensUsed`` (``docs/routing.md``, "Prices"): cache tokens weighted by their price relative to input.

    The weights are the rates of the tier the whole prompt falls in and of the service tier
    granted; a modality's tokens count as the input or output they are part of.
    """
    rates = _token_rates(usage, quote.price)
    input_rate, write_rate, write_1h_rate, read_rate = rates
    one_hour = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    five_minute = usage.cache_write_tokens - one_hour
    with decimal.localcontext(_EXACT):
        if input_rate == 0:
            weighted = (
                usage.input_tokens
                + usage.output_tokens
                + usage.cache_write_tokens * FREE_INPUT_CACHE_WRITE_WEIGHT
                + usage.cache_read_tokens * FREE_INPUT_CACHE_READ_WEIGHT
            )
            return int(weighted * quote.multiplier)
        # One exact division at the end, so that truncation never sees a rounded quotient.
        numerator = (
            (usage.input_tokens + usage.output_tokens) * input_rate
            + five_minute * write_rate
            + one_hour * write_1h_rate
            + usage.cache_read_tokens * read_rate
        )
        return int(numerator * quote.multiplier // input_rate)


def _token_rates(usage: UsageRecord, price: Price) -> tuple[Decimal, Decimal, Decimal, Decimal]:
    """(input, cache write, 1-hour cache write, cache read) rates this usage is billed at; a
    class without a rate of its own is billed as the class it refines."""
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    tier = usage.service_tier

    def rate(*keys: str) -> Decimal:
        for key in keys:
            if (value := price.rate(key, tier)) is not None:
                return price_model.applicable_rate(value, prompt)
        return money.ZERO

    return (
        rate("input"),
        rate("cache_write", "input"),
        rate("cache_write_1h", "cache_write", "input"),
        rate("cache_read", "input"),
    )
