"""The normalised usage of one request: what pricing and the request log consume."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from typing import Any
from typing import Literal

UsageSource = Literal["reported", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Token counts after each provider's convention has been normalised.

    - ``input_tokens`` excludes cached tokens (cache reads and cache writes are separate).
    - ``output_tokens`` includes reasoning tokens.
    - ``cache_write_1h_tokens`` is the part of ``cache_write_tokens`` written with a 1-hour TTL.
    - ``input_audio_tokens`` and ``input_image_tokens`` are parts of ``input_tokens``;
      ``cache_audio_read_tokens`` and ``cache_image_read_tokens`` of ``cache_read_tokens``;
      ``output_audio_tokens`` and ``output_image_tokens`` of ``output_tokens``
      (``clamped`` keeps every part within its whole).
    - ``web_search_requests`` and ``code_executions`` count server-tool uses the provider bills
      per use; ``service_tier`` is the tier the provider reports having served the request at.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    cache_audio_read_tokens: int = 0
    cache_image_read_tokens: int = 0
    output_audio_tokens: int = 0
    output_image_tokens: int = 0
    web_search_requests: int = 0
    code_executions: int = 0
    service_tier: str | None = None
    source: UsageSource = "reported"
    raw: Any = field(default=None, compare=False)

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )

    def clamped(self) -> UsageRecord:
        """This record with each part no larger than its whole (what's left of it, in order)."""
        if (
            self.cache_write_1h_tokens <= self.cache_write_tokens
            and self.input_audio_tokens + self.input_image_tokens <= self.input_tokens
            and self.cache_audio_read_tokens + self.cache_image_read_tokens
            <= self.cache_read_tokens
            and self.output_audio_tokens + self.output_image_tokens <= self.output_tokens
        ):
            return self
        input_audio = min(self.input_audio_tokens, self.input_tokens)
        cache_audio = min(self.cache_audio_read_tokens, self.cache_read_tokens)
        output_audio = min(self.output_audio_tokens, self.output_tokens)
        return replace(
            self,
            cache_write_1h_tokens=min(self.cache_write_1h_tokens, self.cache_write_tokens),
            input_audio_tokens=input_audio,
            input_image_tokens=min(self.input_image_tokens, self.input_tokens - input_audio),
            cache_audio_read_tokens=cache_audio,
            cache_image_read_tokens=min(
                self.cache_image_read_tokens, self.cache_read_tokens - cache_audio
            ),
            output_audio_tokens=output_audio,
            output_image_tokens=min(self.output_image_tokens, self.output_tokens - output_audio),
        )
