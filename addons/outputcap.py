"""Cap the output limit a request is forwarded with: the upstream cannot generate more than
its hold pays for (the config's ``cap_output_tokens``).

Each API names its limit differently; a request that names none gets the name its API
reads today (OpenAI chat: ``max_completion_tokens``, which every OpenAI model accepts,
where ``max_tokens`` is refused by reasoning models). A limit already lower stays.
"""

from __future__ import annotations

from typing import Any

LIMIT_NAMES = {
    "openai.chat": ("max_completion_tokens", "max_tokens"),
    "openai.responses": ("max_output_tokens",),
    "anthropic.messages": ("max_tokens",),
    "gemini.generate": ("maxOutputTokens", "max_output_tokens"),
}
"""Where each API reads its output limit, the name to add first (Gemini: within
``generationConfig``)."""


def cap_output(api: str, body: dict[str, Any], tokens: int) -> bool:
    """Limit ``body``'s output to ``tokens`` (per choice); True if the body changed."""
    names = LIMIT_NAMES.get(api)
    if names is None:  # embeddings generate nothing
        return False
    target = body
    if api == "gemini.generate":
        target = _generation_config(body)
    present = [name for name in names if target.get(name) is not None]
    changed = False
    for name in present or names[:1]:
        if target.get(name) is None or target[name] > tokens:
            target[name] = tokens
            changed = True
    return changed


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    for name in ("generationConfig", "generation_config"):
        found = body.get(name)
        if isinstance(found, dict):
            return found
    created: dict[str, Any] = {}
    body["generationConfig"] = created
    return created
