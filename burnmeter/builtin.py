"""The built-in config's prices: genai-prices' current list prices of the models people
call, looked up when the config is built (``burnmeter.config.default_config``).

A model missing here is refused with a 400 that names the config key pricing it. An
alias is listed only where genai-prices gives it the same price as its model.
"""

from __future__ import annotations

from typing import Any

from burnmeter.exceptions import MissingListPrice
from burnmeter.pricing import list_price

COMMON_MODELS: dict[str, tuple[str, ...]] = {
    # OpenAI
    "gpt-4o": ("gpt-4o-2024-08-06", "gpt-4o-2024-11-20"),
    "gpt-4o-mini": ("gpt-4o-mini-2024-07-18",),
    "gpt-4.1": ("gpt-4.1-2025-04-14",),
    "gpt-4.1-mini": ("gpt-4.1-mini-2025-04-14",),
    "gpt-4.1-nano": ("gpt-4.1-nano-2025-04-14",),
    "gpt-5": ("gpt-5-2025-08-07",),
    "gpt-5-mini": ("gpt-5-mini-2025-08-07",),
    "gpt-5-nano": ("gpt-5-nano-2025-08-07",),
    "o3": ("o3-2025-04-16",),
    "o3-mini": ("o3-mini-2025-01-31",),
    "o4-mini": ("o4-mini-2025-04-16",),
    # Anthropic
    "claude-opus-4-1": ("claude-opus-4-1-20250805",),
    "claude-opus-4-0": ("claude-opus-4-20250514",),
    "claude-sonnet-4-5": ("claude-sonnet-4-5-20250929",),
    "claude-sonnet-4-0": ("claude-sonnet-4-20250514",),
    "claude-haiku-4-5": ("claude-haiku-4-5-20251001",),
    "claude-3-7-sonnet-latest": ("claude-3-7-sonnet-20250219",),
    "claude-3-5-haiku-latest": ("claude-3-5-haiku-20241022",),
    # Google
    "gemini-2.5-pro": (),
    "gemini-2.5-flash": (),
    "gemini-2.5-flash-lite": (),
    "gemini-2.0-flash": (),
}


def builtin_models() -> dict[str, dict[str, Any]]:
    """``[models]`` tables for ``COMMON_MODELS``: each inherits its list price (tiers, media
    rates, fees and service tiers included), checked never to be free."""
    models: dict[str, dict[str, Any]] = {}
    for model_id, aliases in COMMON_MODELS.items():
        listed = list_price(model_id)
        if listed is None or not (listed.rate("input") and listed.rate("output")):
            raise MissingListPrice(f"built-in model {model_id!r}: genai-prices has no price")
        models[model_id] = {"aliases": list(aliases), "list_price": model_id}
    return models
