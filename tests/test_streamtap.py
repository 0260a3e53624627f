"""The stream tap (addons/streamtap.py) and the chunk-at-a-time path of StreamUsage it runs on."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from addons.streamtap import StreamTap
from burnmeter import usage as usage_module
from burnmeter.usage import StreamUsage
from tests.addon_support import chat_sse


@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_tap_passes_bytes_unchanged_and_finds_usage(size: int) -> None:
    body = chat_sse(["Hello", ", world"], {"prompt_tokens": 9, "completion_tokens": 2})
    tap = StreamTap("openai.chat")
    out = b"".join(tap(body[i : i + size]) for i in range(0, len(body), size)) + tap(b"")
    assert out == body
    usage, model = tap.usage.result()
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (9, 2)
    assert model == "gpt-4o" and tap.usage.done and tap.usage.text_chars == 12
    assert tap.first_byte_at is not None and tap.bytes == len(body)


def test_tap_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    tap = StreamTap("openai.chat")

    class Broken:
        def feed(self, chunk: bytes) -> None:
            raise RuntimeError("bug")

    tap.usage = Broken()  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        assert tap(b"data: x\n\n") == b"data: x\n\n"
        assert tap(b"more") == b"more"
    assert caplog.text.count("stream tap failed") == 1


def test_end_event_runs_once_at_the_end_marker() -> None:
    ends: list[int] = []
    tap = StreamTap("openai.chat", on_end_event=lambda: ends.append(tap.bytes))
    body = chat_sse(["Hi"], {"prompt_tokens": 1, "completion_tokens": 1})
    marker = body.index(b"data: [DONE]")
    tap(body[:marker])
    assert ends == [] and not tap.usage.done
    tap(body[marker:])
    tap(b"")
    assert ends == [len(body)] and tap.usage.done


# -- the chunk-at-a-time path agrees with the event-by-event one ------------------------------
MODEL = {
    "openai.chat": "gpt-4o",
    "openai.responses": "gpt-5",
    "anthropic.messages": "claude-sonnet-4-5",
}
texts = st.text(max_size=12) | st.sampled_from(['a "quoted" line\n', "✓ 🦜", "\\", "\ud83d"])


def _json(obj: Any, ascii_only: bool) -> str:
    return json.dumps(obj, ensure_ascii=ascii_only)


@st.composite
def events(draw: st.DrawFn, api: str) -> tuple[str | None, str]:
    """(event name, data): text events mostly, and what the careful path must look at."""
    ascii_only = draw(st.booleans())
    text = draw(texts)
    kind = draw(st.sampled_from(["text"] * 6 + ["usage", "error", "odd", "broken", "done"]))
    if kind == "broken":  # a string the JSON decoder refuses: counted in bytes
        text_field = {"anthropic.messages": "text", "openai.responses": "delta"}.get(api, "content")
        return _event_name(api), f'{{"x": 1, "{text_field}": "ab\\x {draw(texts)}"}}'
    if kind == "done":
        return None, "[DONE]"
    if kind == "odd":
        return draw(st.sampled_from([None, "ping", "content_block_start", "message_stop"])), (
            _json({"type": "text", "text": text, "content": text, "delta": text}, ascii_only)
        )
    if api == "openai.chat":
        chunk: dict[str, Any] = {"model": MODEL[api], "usage": None}
        if kind == "text":
            delta = {draw(st.sampled_from(["content", "reasoning_content"])): text}
            chunk["choices"] = [{"index": 0, "delta": delta}]
        elif kind == "usage":
            chunk |= {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        else:
            chunk["error"] = {"message": text}
        return None, _json(chunk, ascii_only)
    if api == "openai.responses":
        if kind == "text":
            name = draw(st.sampled_from(sorted(usage_module._RESPONSES_TEXT_DELTAS)))
            return name, _json({"type": name, "delta": text}, ascii_only)
        response = {"model": MODEL[api], "usage": {"input_tokens": 5, "output_tokens": 6}}
        if kind == "error":
            response["error"] = {"message": text}
        return "response.completed", _json(
            {"type": "response.completed", "response": response}, ascii_only
        )
    if kind == "text":
        delta = {"type": "text_delta", draw(st.sampled_from(["text", "thinking"])): text}
        return "content_block_delta", _json(
            {"type": "content_block_delta", "delta": delta}, ascii_only
        )
    if kind == "usage":
        return "message_delta", '{"type": "message_delta", "usage": {"output_tokens": 8}}'
    return "error", _json({"type": "error", "error": {"message": text}}, ascii_only)


def _event_name(api: str) -> str | None:
    return {
        "anthropic.messages": "content_block_delta",
        "openai.responses": "response.output_text.delta",
    }.get(api)


def _start(api: str) -> tuple[str | None, str]:
    if api == "anthropic.messages":
        message = {"model": MODEL[api], "usage": {"input_tokens": 2, "output_tokens": 1}}
        return "message_start", json.dumps({"type": "message_start", "message": message})
    if api == "openai.responses":
        return "response.created", json.dumps(
            {"type": "response.created", "response": {"model": MODEL[api]}}
        )
    return None, json.dumps({"model": MODEL[api], "choices": [], "usage": None})


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, bytes, list[bytes]]:
    api = draw(st.sampled_from(sorted(MODEL)))
    body = []
    for name, data in [_start(api), *draw(st.lists(events(api), max_size=12))]:
        lines = ([f"event: {name}"] if name else []) + [f"data: {data}"]
        if draw(st.integers(0, 9)) == 0:
            lines.insert(0, ": a comment")
        if draw(st.integers(0, 9)) == 0 and len(data) > 2:  # multi-line data
            lines[-1:] = [f"data: {data[:2]}", f"data: {data[2:]}"]
        body.append("\n".join(lines) + "\n" * draw(st.sampled_from([2, 2, 2, 3, 4])))
    raw = "".join(body).encode("utf-8", "surrogatepass")
    newline = draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]))
    raw = raw.replace(b"\n", newline)
    cuts = sorted(draw(st.sets(st.integers(1, max(len(raw) - 1, 1)), max_size=12)))
    bounds = [0, *cuts, len(raw)]
    return api, raw, [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def outcome(stream: StreamUsage) -> tuple[Any, ...]:
    record, model = stream.result()
    return (
        record,
        model,
        stream.done,
        stream.text_chars,
        stream.error,
        stream.overflows,
        stream.events,
    )


@settings(deadline=None, max_examples=300)  # no timing asserted: a loaded machine is slow
@given(streams(), st.sampled_from([200, 1 << 20]))
def test_chunk_at_a_time_agrees_with_event_by_event(
    stream: tuple[str, bytes, list[bytes]], max_event_bytes: int
) -> None:
    api, body, chunks = stream
    fast = StreamUsage(api, max_event_bytes=max_event_bytes)
    for chunk in chunks:
        fast.feed(chunk)
    fast.feed(b"")
    events = [part + b"\n\n" for part in body.split(b"\n\n")]  # one event per call
    by_event = StreamUsage(api, max_event_bytes=max_event_bytes)
    for event in events:
        by_event.feed(event)
    text_chunks, usage_module._TEXT_CHUNKS = usage_module._TEXT_CHUNKS, {}
    try:
        careful = StreamUsage(api, max_event_bytes=max_event_bytes)
    finally:
        usage_module._TEXT_CHUNKS = text_chunks
    assert careful._text_chunks is None and fast._text_chunks is not None
    for chunk in chunks:
        careful.feed(chunk)
    careful.feed(b"")
    assert outcome(fast) == outcome(careful)
    assert outcome(by_event)[:5] == outcome(careful)[:5]
