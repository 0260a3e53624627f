"""The normalised usage of one request: what pricing and the request log consume."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Literal

UsageSource = Literal["reported", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Token counts after each provider's convention has been normalised.

    - ``input_tokens`` excludes cached tokens (cache reads and cache writes are separate).
    - ``output_tokens`` includes reasoning tokens.
    - ``cache_write_1h_tokens`` is the part of ``cache_write_tokens`` written with a 1-hour TTL.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
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
