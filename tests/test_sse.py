from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from burnmeter.sse import JSONArrayParser
from burnmeter.sse import SSEEvent
from burnmeter.sse import SSEParser


def parse(*chunks: bytes, max_event_bytes: int = 1 << 20) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser(max_event_bytes)
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close(), parser


STREAM = (
    ": OPENROUTER PROCESSING\n\n"
    "event: message_start\n"
    'data: {"type":"message_start","text":"héllo wörld ✓ 🦜"}\n\n'
    "data: first line\n"
    "data: second line\n"
    ":comment inside an event\n"
    "id: 7\n"
    "retry: 100\n\n"
    "data: [DONE]\n\n"
).encode()
STREAM_EVENTS = [
    SSEEvent("message_start", '{"type":"message_start","text":"héllo wörld ✓ 🦜"}'.encode()),
    SSEEvent(None, b"first line\nsecond line"),
    SSEEvent(None, b"[DONE]"),
]


def test_whole_stream():
    assert parse(STREAM)[0] == STREAM_EVENTS


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_line_endings(newline: str):
    assert parse(STREAM.replace(b"\n", newline.encode()))[0] == STREAM_EVENTS


def test_mixed_line_endings():
    events, _ = parse(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r")
    assert events == [SSEEvent(None, b"a\nb\nc"), SSEEvent(None, b"d")]


def test_every_two_way_split():
    """Including splits inside multi-byte UTF-8 characters and inside CRLF pairs."""
    for stream in (STREAM, STREAM.replace(b"\n", b"\r\n")):
        for i in range(len(stream) + 1):
            assert parse(stream[:i], stream[i:])[0] == STREAM_EVENTS, i


def test_one_byte_chunks_crlf():
    stream = STREAM.replace(b"\n", b"\r\n")
    assert parse(*(stream[i : i + 1] for i in range(len(stream))))[0] == STREAM_EVENTS


def test_cr_at_chunk_end_then_lf_is_one_line_ending():
    # If "\r" + "\n" across chunks counted as two line endings, this would be two events.
    events, _ = parse(b"data: a\r", b"", b"\ndata: b\r", b"\n\r", b"\n")
    assert events == [SSEEvent(None, b"a\nb")]


def test_field_syntax():
    events, _ = parse(b"data:no space\ndata:  two spaces\ndata\nevent:ping\n\n")
    assert events == [SSEEvent("ping", b"no space\n two spaces\n")]


def test_events_without_data_are_not_dispatched():
    events, _ = parse(b": keepalive\n\nevent: ping\n\n\n\n\ndata: x\n\n")
    assert events == [SSEEvent(None, b"x")]


def test_event_name_does_not_leak_into_next_event():
    events, _ = parse(b"event: a\ndata: 1\n\ndata: 2\n\n")
    assert events == [SSEEvent("a", b"1"), SSEEvent(None, b"2")]


def test_missing_trailing_blank_line():
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: 2") == [SSEEvent(None, b"1")]
    assert parser.close() == [SSEEvent(None, b"2")]
    assert parser.buffered == 0


def test_event_ending_in_cr_is_dispatched_without_waiting_for_more():
    parser = SSEParser()
    assert parser.feed(b"data: 1\r\r") == [SSEEvent(None, b"1")]
    assert parser.feed(b"\ndata: 2\r") == []
    assert parser.feed(b"\r") == [SSEEvent(None, b"2")]


def test_bom_is_stripped():
    assert parse(b"\xef\xbb\xbfdata: x\n\n")[0] == [SSEEvent(None, b"x")]


def test_oversize_event_in_one_chunk():
    big = b"data: " + b"x" * 200 + b"\n\n"
    events, parser = parse(b"data: a\n\n" + big + b"data: b\n\n", max_event_bytes=100)
    assert events == [SSEEvent(None, b"a"), SSEEvent(None, b"b")]
    assert parser.overflows == 1


def test_oversize_event_across_chunks():
    stream = b"data: a\n\nevent: big\ndata: " + b"x" * 1000 + b"\n\ndata: b\n\n"
    chunks = [stream[i : i + 30] for i in range(0, len(stream), 30)]
    parser = SSEParser(100)
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
        assert parser.buffered <= 100 + 30
    assert events == [SSEEvent(None, b"a"), SSEEvent(None, b"b")]
    assert parser.overflows == 1


def test_oversize_tail_is_not_dispatched_on_close():
    events, parser = parse(b"data: a\n\ndata: " + b"x" * 500, max_event_bytes=100)
    assert events == [SSEEvent(None, b"a")]
    assert parser.overflows == 1


def test_event_exactly_at_limit_is_kept():
    block = b"data: " + b"x" * 94
    assert len(block) == 100
    events, parser = parse(block + b"\n\n", max_event_bytes=100)
    assert events == [SSEEvent(None, b"x" * 94)] and parser.overflows == 0


def test_garbage_never_raises():
    rng = random.Random(1)
    garbage = bytes(rng.randrange(256) for _ in range(100_000))
    parser = SSEParser(1000)
    pos = 0
    while pos < len(garbage):
        size = rng.randint(1, 2000)
        for event in parser.feed(garbage[pos : pos + size]):
            assert isinstance(event.data, bytes)
        pos += size
        assert parser.buffered <= 1000 + 2000
    # A blank line resynchronises the parser.
    assert parser.feed(b"\n\ndata: ok\n\n")[-1] == SSEEvent(None, b"ok")


def test_long_event_in_tiny_chunks_is_linear():
    """The search for the blank line resumes where it stopped instead of rescanning."""
    stream = b"data: " + b"x" * (256 * 1024) + b"\n\n"
    parser = SSEParser()
    started = time.perf_counter()
    events = [event for i in range(len(stream)) for event in parser.feed(stream[i : i + 1])]
    assert time.perf_counter() - started < 3  # ~0.3 s; rescanning takes ~25 s
    assert events == [SSEEvent(None, b"x" * (256 * 1024))]


def test_bounded_memory_on_a_50_mb_stream():
    max_event = 256 * 1024
    chunk_size = 64 * 1024
    normal = b'data: {"choices":[{"delta":{"content":"' + b"y" * 900 + b'"}}],"usage":null}\n\n'
    oversize = b"data: " + b"z" * (3 * max_event) + b"\n\n"
    unit = normal * 1000 + oversize
    repeats = 50 * 1024 * 1024 // len(unit) + 1
    parser = SSEParser(max_event)
    events = 0
    peak_buffered = 0
    tracemalloc.start()
    try:
        for _ in range(repeats):
            for pos in range(0, len(unit), chunk_size):
                events += len(parser.feed(unit[pos : pos + chunk_size]))
                peak_buffered = max(peak_buffered, parser.buffered)
        _, peak_allocated = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert repeats * len(unit) >= 50 * 1024 * 1024
    assert events == repeats * 1000
    assert parser.overflows == repeats
    assert peak_buffered <= 2 * max_event
    # The buffer, the chunk being fed and the events it completed; nothing accumulates.
    assert peak_allocated < 2 * max_event + 2 * chunk_size


def split_array(*chunks: bytes, max_event_bytes: int = 1 << 20) -> list[bytes]:
    parser = JSONArrayParser(max_event_bytes)
    elements = [element for chunk in chunks for element in parser.feed(chunk)]
    assert parser.closed
    return elements


ARRAY = (
    b'[{"a": "x]}\\"{[", "b": [1, {"c": 2}]}\n,\r\n'
    b'{"text": "\\\\"}, 3, "s]", [4, {"d": "\xc3\xa9"}]\n]'
)
ARRAY_ELEMENTS = [
    b'{"a": "x]}\\"{[", "b": [1, {"c": 2}]}',
    b'{"text": "\\\\"}',
    b'[4, {"d": "\xc3\xa9"}]',
]


def test_json_array_elements():
    assert split_array(ARRAY) == ARRAY_ELEMENTS


def test_json_array_every_split():
    """Including a split between a backslash and the character it escapes."""
    for i in range(len(ARRAY) + 1):
        assert split_array(ARRAY[:i], ARRAY[i:]) == ARRAY_ELEMENTS, i
    assert split_array(*(ARRAY[i : i + 1] for i in range(len(ARRAY)))) == ARRAY_ELEMENTS


def test_json_top_level_object_is_one_element():
    body = b'{"error": {"code": 429, "message": "}"}}'
    assert split_array(body[:10], body[10:]) == [body]


def test_json_array_oversize_element_is_dropped():
    parser = JSONArrayParser(max_event_bytes=50)
    body = b'[{"a": 1}, {"big": "' + b"x" * 200 + b'"}, {"b": 2}]'
    elements = [
        element for i in range(0, len(body), 16) for element in parser.feed(body[i : i + 16])
    ]
    assert elements == [b'{"a": 1}', b'{"b": 2}']
    assert parser.overflows == 1
    assert parser.closed


def test_json_array_unfinished_is_not_closed():
    parser = JSONArrayParser()
    assert parser.feed(b'[{"a": 1}, {"b"') == [b'{"a": 1}']
    assert not parser.closed
    assert parser.buffered == len(b'{"b"')


def test_json_garbage_never_raises():
    rng = random.Random(2)
    garbage = bytes(rng.randrange(256) for _ in range(50_000))
    parser = JSONArrayParser(1000)
    for pos in range(0, len(garbage), 997):
        parser.feed(garbage[pos : pos + 997])
        assert parser.buffered <= 1000
