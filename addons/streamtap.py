"""The stream callable set on LLM streaming responses: meter the bytes, forward them as is.

mitmproxy calls it once per received chunk (and with ``b""`` at the end) inside the
connection's event handler, so it must stay cheap, never block and never raise: an
exception there hangs the client.
"""

from __future__ import annotations

import logging
import time

from burnmeter.usage import StreamUsage

logger = logging.getLogger(__name__)


class StreamTap:
    def __init__(self, api: str) -> None:
        self.usage = StreamUsage(api, collect_text=True)
        self.first_byte_at: float | None = None
        """``time.time()`` of the first body bytes (time to first token)."""
        self.bytes = 0
        self._failed = False

    def __call__(self, data: bytes) -> bytes:
        try:
            if data:
                if self.first_byte_at is None:
                    self.first_byte_at = time.time()
                self.bytes += len(data)
                self.usage.feed(data)
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("metering: stream tap failed, passing the stream through")
        return data
