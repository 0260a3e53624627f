"""Incremental framing of streamed response bodies: Server-Sent Events and JSON arrays.

Both parsers are fed raw chunks exactly as they arrive from the network (TCP reads or h2
DATA frames, split anywhere), keep only the unfinished tail, cap one event at
``max_event_bytes`` and never raise: they run inside mitmproxy's stream callable, where an
exception hangs the client.
"""

from __future__ import annotations

import re
from typing import NamedTuple

MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    event: str | None
    """The ``event:`` field, or None for the default ("message") type."""
    data: bytes
    """The ``data:`` lines joined with ``\\n``, undecoded."""


class SSEParser:
    """An event-stream parser (WHATWG HTML, "Server-sent events"), minus ``id``/``retry``.

    Line endings are normalised to ``\\n`` per chunk, so event boundaries are found with
    ``bytes`` searches instead of a per-line loop. ``take`` returns all the event blocks a
    chunk completed as one ``bytes`` (a caller may judge them all at once, with one regex
    over it, and only then split them); ``feed`` = ``events(take(chunk))``. An event whose
    block exceeds ``max_event_bytes`` is dropped, counted in ``overflows``, and parsing
    resumes after its terminating blank line.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.overflows = 0
        self._buf = bytearray()
        # Where the next search for a blank line starts: everything before it is known not
        # to contain one, so a long event arriving in small chunks is not rescanned.
        self._scan_from = 0
        self._skipping = False
        self._started = False
        self._after_cr = False

    @property
    def buffered(self) -> int:
        """Bytes currently held for an unfinished event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Consume one chunk and return the events it completed."""
        return self.events(self.take(chunk))

    def take(self, chunk: bytes) -> bytes:
        """Consume one chunk and return the event blocks it completed, each followed by its
        blank line (``b"\\n\\n"``), line endings normalised, oversized blocks left out;
        ``b""`` if it completed none."""
        if not chunk:
            return b""
        if not self._started:
            self._started = True
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if self._after_cr:
            # A CR ending the previous chunk already ended the line; an LF right after it
            # is the second half of that CRLF.
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
            self._after_cr = False
        if 13 in chunk:  # an int: a memchr, where b"\r" in chunk sets up a substring search
            self._after_cr = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf
        if not buf:
            # The common case, an event per read: the chunk is the blocks, no copy.
            if chunk.endswith(b"\n\n") and len(chunk) <= self.max_event_bytes:
                return chunk
            if not chunk:
                return b""
        buf += chunk
        # The last blank line ends the last complete block. If it overlaps the one before
        # ("\n\n\n"), the first "\n" ended a block and the second is an empty line, which
        # dispatches nothing; the region ends after it either way.
        end = buf.rfind(b"\n\n", self._scan_from)
        blocks = b""
        if end >= 0:
            blocks = bytes(buf[: end + 2])
            del buf[: end + 2]
            if self._skipping:  # the first block is the end of an oversized event
                self._skipping = False
                blocks = blocks[blocks.find(b"\n\n") + 2 :]
            if len(blocks) > self.max_event_bytes:
                blocks = self._without_oversized(blocks)
        if not self._skipping and len(buf) > self.max_event_bytes:
            self.overflows += 1
            self._skipping = True
        if self._skipping:
            # Keep the last byte: it may be the first "\n" of the terminating blank line.
            del buf[:-1]
        self._scan_from = max(len(buf) - 1, 0)
        return blocks

    def _without_oversized(self, blocks: bytes) -> bytes:
        kept = []
        start = 0
        end = blocks.find(b"\n\n")
        while end >= 0:
            if end - start > self.max_event_bytes:
                self.overflows += 1
            else:
                kept.append(blocks[start : end + 2])
            start = end + 2
            end = blocks.find(b"\n\n", start)
        return b"".join(kept)

    @staticmethod
    def events(blocks: bytes) -> list[SSEEvent]:
        """The events of blocks from ``take``."""
        events: list[SSEEvent] = []
        start = 0
        end = blocks.find(b"\n\n")
        while end >= 0:
            event = _parse_block(blocks[start:end])
            if event is not None:
                events.append(event)
            start = end + 2
            end = blocks.find(b"\n\n", start)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: dispatch a final event that lacks its trailing blank line."""
        event = None if self._skipping else _parse_block(bytes(self._buf))
        self._buf.clear()
        self._scan_from = 0
        self._skipping = False
        return [] if event is None else [event]


def _parse_block(block: bytes) -> SSEEvent | None:
    """One event from the lines between two blank lines; None if it has no data field."""
    # Fast paths for what LLM APIs send: "data: X" and "event: Y\ndata: X".
    newline = block.find(b"\n")
    if newline < 0:
        if block.startswith(b"data: "):
            return SSEEvent(None, block[6:])
    elif (
        block.startswith(b"event: ")
        and block.startswith(b"data: ", newline + 1)
        and block.find(b"\n", newline + 1) < 0
    ):
        return SSEEvent(block[7:newline].decode("utf-8", "replace") or None, block[newline + 7 :])
    event: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace") or None
    if not data:
        return None
    return SSEEvent(event, b"\n".join(data))


_OUTSIDE_STRING = re.compile(rb'[\[\]{}"]')
_INSIDE_STRING = re.compile(rb'["\\]')


class JSONArrayParser:
    """Splits a streamed JSON array into its elements without parsing them.

    Gemini's ``:streamGenerateContent`` without ``alt=sse`` sends one JSON array whose
    elements arrive over time. Each object or array element is returned as bytes once it is
    complete; a top-level object (e.g. an error body) is returned whole. Only brackets,
    braces, quotes and backslashes are looked at, so malformed input yields garbage elements
    (which fail to decode later) rather than an exception.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.overflows = 0
        self.closed = False
        """The top-level value has ended."""
        self._depth = 0
        self._base: int | None = None  # nesting depth at which elements start
        self._in_string = False
        self._escaped = False
        self._parts: list[bytes] = []
        self._size = 0
        self._in_element = False
        self._skipping = False

    @property
    def buffered(self) -> int:
        """Bytes currently held for an unfinished element."""
        return self._size

    def feed(self, chunk: bytes) -> list[bytes]:
        elements: list[bytes] = []
        start = 0  # of the current element's part in this chunk
        pos = 0
        if self._escaped and chunk:
            self._escaped = False
            pos = 1
        n = len(chunk)
        while pos < n:
            if self._in_string:
                m = _INSIDE_STRING.search(chunk, pos)
                if m is None:
                    break
                pos = m.end()
                if m.group() == b"\\":
                    if pos == n:
                        self._escaped = True
                    pos += 1
                else:
                    self._in_string = False
                continue
            m = _OUTSIDE_STRING.search(chunk, pos)
            if m is None:
                break
            char = m.group()
            at = m.start()
            pos = m.end()
            if char == b'"':
                self._in_string = True
            elif char in b"[{":
                if self._base is None:
                    self._base = 1 if char == b"[" else 0
                if self._depth == self._base and not self._in_element:
                    self._in_element = True
                    start = at
                self._depth += 1
            else:
                self._depth = max(self._depth - 1, 0)
                if self._depth == self._base and self._in_element:
                    self._in_element = False
                    self._append(chunk[start:pos])
                    if not self._skipping:
                        elements.append(b"".join(self._parts))
                    self._reset_element()
                if self._depth == 0:
                    self.closed = True
        if self._in_element:
            self._append(chunk[start:])
        return elements

    def _append(self, part: bytes) -> None:
        if self._skipping:
            return
        self._size += len(part)
        if self._size > self.max_event_bytes:
            self.overflows += 1
            self._skipping = True
            self._parts.clear()
            self._size = 0
        else:
            self._parts.append(part)

    def _reset_element(self) -> None:
        self._parts.clear()
        self._size = 0
        self._skipping = False
