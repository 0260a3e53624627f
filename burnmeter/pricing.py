"""Prices and costs (SPEC "Prices").

``resolve_price`` turns a requested model name into a ``PriceQuote`` under the config's
unknown-model policy; ``cost`` and ``billing_tokens`` price a normalised ``UsageRecord``.

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
from typing import Literal

from genai_prices import data_snapshot
from genai_prices.types import TieredPrices

from burnmeter import money
from burnmeter.config import Config
from burnmeter.records import UsageRecord

PriceSource = Literal["config", "default", "list-price"]

ONE_HOUR_WRITE_FACTOR = Decimal(2)
# The original's billing-token weights when a model's input price is 0.
FREE_INPUT_CACHE_WRITE_WEIGHT = Decimal(1)
FREE_INPUT_CACHE_READ_WEIGHT = Decimal("0.1")
# Enough digits that token counts times prices never round before the final quantize.
_EXACT = decimal.Context(prec=60)


class UnknownModelError(ValueError):
    """No price for the model under the config's policy: the request is refused (400)."""


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per million tokens."""

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal

    @classmethod
    def with_defaults(
        cls,
        input: Decimal,
        output: Decimal,
        cache_write: Decimal | None = None,
        cache_write_1h: Decimal | None = None,
        cache_read: Decimal | None = None,
    ) -> Rate:
        return cls(
            input=input,
            output=output,
            cache_write=input if cache_write is None else cache_write,
            cache_write_1h=input * ONE_HOUR_WRITE_FACTOR
            if cache_write_1h is None
            else cache_write_1h,
            cache_read=input if cache_read is None else cache_read,
        )


@dataclass(frozen=True, slots=True)
class PriceQuote:
    """How one request is priced: the rate, the combined multiplier, and where they came from."""

    model: str
    """The configured model id an alias resolved to, or the requested name."""
    rate: Rate
    multiplier: Decimal
    source: PriceSource
    pool: str | None = None
    """The model's pool override, if the config sets one."""


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
        rate = Rate.with_defaults(
            model.input, model.output, model.cache_write, model.cache_write_1h, model.cache_read
        )
        if model.pool is not None:
            # the pool it bills brings its own multiplier, never the called host's cheaper one
            route_multiplier = model.route_multiplier or config.pool_multiplier(model.pool)
        return PriceQuote(model_id, rate, route_multiplier * model.multiplier, "config", model.pool)
    if config.unknown_model == "default":
        default = config.default_price
        assert default is not None  # the config validator requires it for this policy
        rate = Rate.with_defaults(
            default.input,
            default.output,
            default.cache_write,
            default.cache_write_1h,
            default.cache_read,
        )
        return PriceQuote(model_name, rate, route_multiplier, "default")
    if config.unknown_model == "list-price":
        if listed := list_price(model_name, upstream_url):
            return PriceQuote(model_name, listed, route_multiplier, "list-price")
        raise UnknownModelError(f"unknown model {model_name!r}: no configured or list price")
    raise UnknownModelError(f"unknown model {model_name!r}")


def list_price(model_name: str, upstream_url: str | None = None) -> Rate | None:
    """genai-prices' current list price, or None if it does not know the model.

    Tries the provider of ``upstream_url``, then the provider genai-prices infers from the
    name, then a ``provider/model`` name split in two. Long-context tiers are not applied:
    the base rate is used. A missing output price (embedding models) is the input price.
    """
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
        prices = model.get_prices(datetime.now(UTC))
        input = _base(getattr(prices, "input_mtok", None))
        if input is None:
            continue
        output = _base(getattr(prices, "output_mtok", None))
        return Rate.with_defaults(
            input,
            input if output is None else output,
            _base(getattr(prices, "cache_write_mtok", None)),
            _base(getattr(prices, "cache_write_1h_mtok", None)),
            _base(getattr(prices, "cache_read_mtok", None)),
        )
    return None


def _base(price: object) -> Decimal | None:
    if isinstance(price, TieredPrices):
        return price.base
    if isinstance(price, Decimal):
        return price
    return None


def cost(usage: UsageRecord, quote: PriceQuote) -> Decimal:
    """USD for ``usage``: exact, rounded once to ``money.PRECISION``."""
    rate = quote.rate
    one_hour = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    with decimal.localcontext(_EXACT):
        per_million = (
            usage.input_tokens * rate.input
            + usage.output_tokens * rate.output
            + (usage.cache_write_tokens - one_hour) * rate.cache_write
            + one_hour * rate.cache_write_1h
            + usage.cache_read_tokens * rate.cache_read
        )
        return money.quantize(per_million * quote.multiplier / 1_000_000)


def billing_tokens(usage: UsageRecord, quote: PriceQuote) -> int:
    """The original's ``tokensUsed``: cache tokens weighted by their price relative to input."""
    rate = quote.rate
    one_hour = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    five_minute = usage.cache_write_tokens - one_hour
    with decimal.localcontext(_EXACT):
        if rate.input == 0:
            weighted = (
                usage.input_tokens
                + usage.output_tokens
                + usage.cache_write_tokens * FREE_INPUT_CACHE_WRITE_WEIGHT
                + usage.cache_read_tokens * FREE_INPUT_CACHE_READ_WEIGHT
            )
            return int(weighted * quote.multiplier)
        # One exact division at the end, so that truncation never sees a rounded quotient.
        numerator = (
            (usage.input_tokens + usage.output_tokens) * rate.input
            + five_minute * rate.cache_write
            + one_hour * rate.cache_write_1h
            + usage.cache_read_tokens * rate.cache_read
        )
        return int(numerator * quote.multiplier // rate.input)
