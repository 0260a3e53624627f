"""The stream callable set on LLM streaming responses: meter the bytes, forward them as is.

mitmproxy calls it once per received chunk (and with ``b""`` at the end) inside the
connection's event handler, so it must stay cheap, never block and never raise: an
exception there hangs the client.

The proxy asks for ``accept-encoding: identity`` on streams, but an upstream may compress
anyway. The client still gets the bytes as they came; the tap meters a decompressed copy:
gzip and zlib are recognised by their magic bytes, and ``content_encoding`` (the response's
``Content-Encoding``) also selects br or zstd. Decompression is bounded per step, so a
compression bomb cannot grow memory beyond the SSE parser's one-event limit.

``on_end_event`` runs once, as soon as the stream's own end marker has been read (OpenAI's
``[DONE]``, Anthropic's ``message_stop``, a terminal Responses event, Gemini's final
chunk): the usage is known then, and the request is settled before the client gets that
marker, even if the upstream never ends the HTTP message.
"""

from __future__ import annotations

import logging
import sys
import time
import zlib
from collections.abc import Callable
from collections.abc import Iterator

from burnmeter.usage import StreamUsage

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # mitmproxy depends on the backport
    from backports import zstd

logger = logging.getLogger(__name__)

DECOMPRESS_STEP = 256 * 1024
"""Most decompressed bytes produced (and fed to the parser) at a time."""
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Inflate = Callable[[bytes], Iterator[bytes]]


def _zlib_inflater(wbits: int) -> Inflate:
    z = zlib.decompressobj(wbits)

    def inflate(data: bytes) -> Iterator[bytes]:
        nonlocal z
        while data:
            out = z.decompress(data, DECOMPRESS_STEP)
            if out:
                yield out
            if z.eof:  # a gzip body may be several members, one after the other
                data = z.unused_data
                z = zlib.decompressobj(wbits)
            else:
                data = z.unconsumed_tail

    return inflate


def _brotli_inflater() -> Inflate:
    import brotli  # mitmproxy depends on it

    b = brotli.Decompressor()

    def inflate(data: bytes) -> Iterator[bytes]:
        yield b.process(data)

    return inflate


def _zstd_inflater() -> Inflate:
    z = zstd.ZstdDecompressor()

    def inflate(data: bytes) -> Iterator[bytes]:
        nonlocal z
        while True:
            out = z.decompress(data, DECOMPRESS_STEP)
            if out:
                yield out
            if z.eof:  # the next frame, if any
                data = z.unused_data
                z = zstd.ZstdDecompressor()
                if not data:
                    return
            elif z.needs_input:
                return
            else:
                data = b""  # more output is due for what it has

    return inflate


def is_zlib_header(data: bytes) -> bool:
    """RFC 1950: deflate method, window <= 32K, header checksum a multiple of 31."""
    return len(data) >= 2 and data[0] & 0x8F == 0x08 and (data[0] << 8 | data[1]) % 31 == 0


def inflater_for(encoding: str | None, first: bytes) -> Inflate | None:
    """How to decompress a body with this Content-Encoding starting with ``first``."""
    name = (encoding or "").strip().lower()
    if name in ("gzip", "x-gzip") or first.startswith(GZIP_MAGIC):
        return _zlib_inflater(16 + zlib.MAX_WBITS)
    if name == "zstd" or first.startswith(ZSTD_MAGIC):
        return _zstd_inflater()
    if name == "deflate":
        return _zlib_inflater(zlib.MAX_WBITS if is_zlib_header(first) else -zlib.MAX_WBITS)
    if is_zlib_header(first) and first[:1] == b"x":
        return _zlib_inflater(zlib.MAX_WBITS)
    if name == "br":
        return _brotli_inflater()
    return None


class StreamTap:
    def __init__(
        self,
        api: str,
        content_encoding: str | None = None,
        on_end_event: Callable[[], None] | None = None,
    ) -> None:
        self.usage = StreamUsage(api, collect_text=True)
        self.on_end_event = on_end_event
        self.content_encoding = content_encoding
        self.first_byte_at: float | None = None
        """``time.time()`` of the first body bytes (time to first token)."""
        self.bytes = 0
        self._inflate: Inflate | None = None
        self._head: bytes | None = b""
        """The first bytes, until there are enough to recognise a compressed body."""
        self._failed = False

    def __call__(self, data: bytes) -> bytes:
        try:
            if data:
                if self.first_byte_at is None:
                    self.first_byte_at = time.time()
                self.bytes += len(data)
                if self._head is None and self._inflate is None:  # a plain body, known
                    self.usage.feed(data)
                else:
                    self._meter(data)
            elif self._head:
                self._meter(b"", end=True)
            if self.usage.done and self.on_end_event is not None:
                on_end_event, self.on_end_event = self.on_end_event, None
                on_end_event()
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("metering: stream tap failed, passing the stream through")
        return data

    def _meter(self, data: bytes, end: bool = False) -> None:
        if self._head is not None:
            data = self._head + data
            if len(data) < len(ZSTD_MAGIC) and not end:  # the longest magic number
                self._head = data
                return
            self._head = None
            self._inflate = inflater_for(self.content_encoding, data)
        if self._inflate is None:
            self.usage.feed(data)
        else:
            for plain in self._inflate(data):
                self.usage.feed(plain)
