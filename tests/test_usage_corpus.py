"""Every recorded exchange of the corpus, read as the proxy would read it, in many chunkings."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from burnmeter.records import UsageRecord
from burnmeter.usage import StreamUsage
from burnmeter.usage import usage_from_json
from tests.corpus import case_params
from tests.corpus import is_stream

# Stream cases whose body carries an in-band error object.
IN_BAND_ERRORS = {"groq/chat-stream-error-event", "openrouter/chat-stream-error-with-usage"}
# Stream cases that end without the stream's own end marker.
UNTERMINATED = {"groq/chat-stream-error-event"}
# Generated characters counted by hand from the bodies.
TEXT_CHARS = {
    "anthropic/stream-basic": len("-" + " Captain" + "\n- Sc" + "oop"),
    "openai/responses-stream-basic": len("pong"),
    "openai/chat-stream-include-usage": len('"This is a test."'),
}

# Billed facts outside the six token counts, read by hand from the bodies: the service tier
# each response reports, server-tool uses, Gemini's image tokens by modality.
STANDARD = {"service_tier": "standard"}
DEFAULT = {"service_tier": "default"}
BILLED_EXTRAS: dict[str, dict[str, Any]] = {
    "anthropic/messages-basic": STANDARD,
    "anthropic/messages-parallel-tool-use": STANDARD,
    "anthropic/stream-basic": STANDARD,
    "anthropic/stream-thinking": STANDARD,
    "anthropic/stream-tool-use": STANDARD,
    "anthropic/stream-web-search-server-tool": {"web_search_requests": 1, **STANDARD},
    # promptTokensDetails IMAGE 258 of which cacheTokensDetails IMAGE 175
    "gemini/generate-cached-content": {"input_image_tokens": 83, "cache_image_read_tokens": 175},
    # URL context, not Google Search: its groundingChunks are not a billed search
    "openai/chat-cached-tokens": DEFAULT,
    "openai/chat-reasoning-tokens": DEFAULT,
    "openai/chat-stream-cached-tokens": DEFAULT,
    "openai/chat-stream-tool-calls": DEFAULT,
    "openai/responses-basic": DEFAULT,
    "openai/responses-reasoning": DEFAULT,
    "openai/responses-stream-basic": DEFAULT,
    "openai/responses-stream-reasoning": {"service_tier": "flex"},
    "openai/responses-stream-tool-call": DEFAULT,
    "openai/responses-stream-web-search-cached": {"web_search_requests": 1, **DEFAULT},
    "openai/responses-tool-call": DEFAULT,
}


def expected_record(case: dict[str, Any]) -> UsageRecord | None:
    """The corpus's ``expected_usage`` (provider fields copied verbatim) normalised.

    The provider conventions, written out once, independently of burnmeter.usage:
    OpenAI-format prompt counts include cache reads and writes; Anthropic's input excludes
    them; Gemini's prompt includes cached content, its output excludes thoughts, and its
    tool-use prompt (only in ``raw_usage``) is extra input. No corpus case has a 1-hour
    Anthropic cache write.
    """
    expected = case["expected_usage"]
    if expected is None:
        return None

    def n(key: str) -> int:
        return expected[key] or 0

    api = case["api"]
    if api in ("openai.chat", "openai.responses"):
        return UsageRecord(
            input_tokens=n("input_tokens") - n("cache_read_tokens") - n("cache_write_tokens"),
            output_tokens=n("output_tokens"),
            cache_read_tokens=n("cache_read_tokens"),
            cache_write_tokens=n("cache_write_tokens"),
            reasoning_tokens=n("reasoning_tokens"),
        )
    if api == "openai.embeddings":
        return UsageRecord(input_tokens=n("input_tokens"))
    if api == "anthropic.messages":
        return UsageRecord(
            input_tokens=n("input_tokens"),
            output_tokens=n("output_tokens"),
            cache_read_tokens=n("cache_read_tokens"),
            cache_write_tokens=n("cache_write_tokens"),
        )
    assert api in ("gemini.generate", "gemini.embed")
    tool_use = case["raw_usage"].get("toolUsePromptTokenCount", 0)
    return UsageRecord(
        input_tokens=n("input_tokens") - n("cache_read_tokens") + tool_use,
        output_tokens=n("output_tokens") + n("reasoning_tokens"),
        cache_read_tokens=n("cache_read_tokens"),
        reasoning_tokens=n("reasoning_tokens"),
    )


def chunkings(body: bytes) -> dict[str, list[bytes]]:
    result = {
        "whole": [body],
        "1-byte": [body[i : i + 1] for i in range(len(body))],
        "7-byte": [body[i : i + 7] for i in range(0, len(body), 7)],
    }
    for seed in range(4):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(1, 40))))
        bounds = [0, *cuts, len(body)]
        result[f"random-{seed}"] = [body[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return result


def check_record(case: dict[str, Any], record: UsageRecord | None, name: str) -> None:
    expected = expected_record(case)
    if expected is not None:
        expected = dataclasses.replace(expected, **BILLED_EXTRAS.get(name, {}))
    assert record == expected
    if record is not None:
        assert record.source == "reported"
        assert record.raw == case["raw_usage"]
        if case["expected_usage"]["total_tokens"] is not None:
            assert record.total_tokens == case["expected_usage"]["total_tokens"]


@pytest.mark.parametrize("collect_text", [True, False], ids=["text", "no-text"])
@pytest.mark.parametrize(("name", "case"), case_params())
def test_corpus_case(name: str, case: dict[str, Any], collect_text: bool) -> None:
    body = case["response"]["body"].encode()
    if not is_stream(case):
        record, model = usage_from_json(case["api"], body)
        check_record(case, record, name)
        # Gemini embedding responses name no model.
        assert bool(model) == (record is not None and case["api"] != "gemini.embed")
        return

    outcomes = {}
    for chunking, chunks in chunkings(body).items():
        assert b"".join(chunks) == body
        stream = StreamUsage(case["api"], collect_text=collect_text)
        for chunk in chunks:
            stream.feed(chunk)
        stream.feed(b"")
        record, model = stream.result()
        check_record(case, record, name)
        assert model
        assert stream.overflows == 0
        assert (stream.error is not None) == (name in IN_BAND_ERRORS)
        assert stream.done == (name not in UNTERMINATED)
        if not collect_text:
            assert stream.text_chars == 0
        elif name in TEXT_CHARS:
            assert stream.text_chars == TEXT_CHARS[name]
        outcomes[chunking] = (record, model, stream.text_chars, stream.done, stream.error)
    assert len(set(map(repr, outcomes.values()))) == 1, outcomes
