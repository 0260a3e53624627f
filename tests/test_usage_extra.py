"""Usage extraction cases the recorded corpus lacks, written from the providers' documented
formats (Anthropic streaming and errors docs, OpenAI Responses streaming events, Gemini
UsageMetadata, DeepSeek context caching, OpenRouter usage accounting)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from burnmeter import usage as usage_module
from burnmeter.records import UsageRecord
from burnmeter.usage import StreamUsage
from burnmeter.usage import api_for
from burnmeter.usage import usage_from_json


def sse(*events: tuple[str | None, Any]) -> bytes:
    out = []
    for name, data in events:
        if name:
            out.append(f"event: {name}\n")
        out.append(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n")
    return "".join(out).encode()


def read_stream(
    api: str, body: bytes, *, collect_text: bool = True, chunk: int = 5, **kwargs: Any
) -> StreamUsage:
    stream = StreamUsage(api, collect_text=collect_text, **kwargs)
    for pos in range(0, len(body), chunk):
        stream.feed(body[pos : pos + chunk])
    stream.feed(b"")
    return stream


@pytest.mark.parametrize(
    ("path", "api"),
    [
        ("/v1/chat/completions", "openai.chat"),
        ("/chat/completions", "openai.chat"),
        ("/openai/v1/chat/completions", "openai.chat"),
        ("/api/v1/chat/completions", "openai.chat"),
        ("/beta/chat/completions", "openai.chat"),
        ("/v1/chat/completions?api-version=2024-10-21", "openai.chat"),
        ("/v1/chat/completions/", "openai.chat"),
        ("/v1/responses", "openai.responses"),
        ("/responses", "openai.responses"),
        ("/v1/embeddings", "openai.embeddings"),
        ("/v1/messages", "anthropic.messages"),
        ("/v1/messages?beta=true", "anthropic.messages"),
        ("/v1beta/models/gemini-2.5-flash:generateContent", "gemini.generate"),
        ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", "gemini.generate"),
        ("/v1beta/models/gemini-flash-latest:streamGenerateContent", "gemini.generate"),
        ("/v1beta/tunedModels/my-model-1:generateContent", "gemini.generate"),
        ("/v1beta/models/gemini-embedding-001:embedContent", "gemini.embed"),
        ("/v1beta/models/gemini-embedding-001:batchEmbedContents", "gemini.embed"),
        ("/v1/messages/count_tokens", None),
        ("/v1beta/models/gemini-2.5-flash:countTokens", None),
        ("/v1/models", None),
        ("/v1beta/models/gemini-2.5-flash", None),
        ("/v1/chat/completions/chatcmpl-123", None),
        ("/v1/responses/resp_123", None),
        ("/v1/completions", None),
        ("/", None),
        ("", None),
    ],
)
def test_api_for(path: str, api: str | None):
    assert api_for(path) == api


MESSAGE_START: dict[str, Any] = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [],
        "usage": {
            "input_tokens": 25,
            "cache_creation_input_tokens": 3000,
            "cache_read_input_tokens": 400,
            "cache_creation": {
                "ephemeral_5m_input_tokens": 1000,
                "ephemeral_1h_input_tokens": 2000,
            },
            "output_tokens": 1,
        },
    },
}


def test_anthropic_error_event_mid_stream():
    body = sse(
        ("message_start", MESSAGE_START),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hel"},
            },
        ),
        (
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ),
    )
    for collect_text in (True, False):
        stream = read_stream("anthropic.messages", body, collect_text=collect_text)
        record, model = stream.result()
        assert stream.error == {"type": "overloaded_error", "message": "Overloaded"}
        assert not stream.done
        assert model == "claude-sonnet-4-5"
        assert stream.text_chars == (3 if collect_text else 0)
        # Only message_start's counts: the caller sees error and not done, and decides.
        assert record == UsageRecord(
            input_tokens=25,
            output_tokens=1,
            cache_read_tokens=400,
            cache_write_tokens=3000,
            cache_write_1h_tokens=2000,
        )


def test_anthropic_one_hour_cache_write_json():
    body = json.dumps(MESSAGE_START["message"])
    record, model = usage_from_json("anthropic.messages", body.encode())
    assert model == "claude-sonnet-4-5"
    assert record is not None
    assert (record.cache_write_tokens, record.cache_write_1h_tokens) == (3000, 2000)
    assert record.input_tokens == 25


def test_anthropic_cache_write_from_breakdown_only():
    body = {
        "usage": {
            "input_tokens": 5,
            "output_tokens": 7,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 50},
        }
    }
    record, _ = usage_from_json("anthropic.messages", json.dumps(body).encode())
    assert record == UsageRecord(
        input_tokens=5, output_tokens=7, cache_write_tokens=150, cache_write_1h_tokens=50
    )


def test_anthropic_stream_delta_merges_and_nulls_do_not_erase():
    body = sse(
        ("message_start", MESSAGE_START),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"input_tokens": None, "output_tokens": 40},
            },
        ),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {},
                "usage": {"input_tokens": 90, "output_tokens": 55},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    stream = read_stream("anthropic.messages", body, collect_text=False)
    record, _ = stream.result()
    assert stream.done
    assert record is not None
    assert (record.input_tokens, record.output_tokens, record.cache_write_1h_tokens) == (
        90,
        55,
        2000,
    )
    assert record.raw == {
        "message_start": MESSAGE_START["message"]["usage"],
        "message_delta": {"input_tokens": 90, "output_tokens": 55},
    }


@pytest.mark.parametrize(
    ("api", "status_body"),
    [
        (
            "anthropic.messages",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        ),
        (
            "anthropic.messages",
            {"type": "error", "error": {"type": "api_error", "message": "Internal server error"}},
        ),
        (
            "openai.chat",
            {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
        ),
        (
            "openai.responses",
            {
                "error": {
                    "message": "Service unavailable",
                    "type": "server_error",
                    "param": None,
                    "code": "server_error",
                }
            },
        ),
        (
            "gemini.generate",
            {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded.",
                    "status": "UNAVAILABLE",
                }
            },
        ),
        (
            "gemini.generate",
            [
                {
                    "error": {
                        "code": 500,
                        "message": "Internal error encountered.",
                        "status": "INTERNAL",
                    }
                }
            ],
        ),
    ],
)
def test_5xx_json_bodies(api: str, status_body: Any):
    body = json.dumps(status_body).encode()
    assert usage_from_json(api, body) == (None, None)
    stream = read_stream(api, body)
    assert stream.result() == (None, None)
    assert stream.error is not None and stream.error.get("message")


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        b"",
        b"upstream connect error or disconnect/reset before headers",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
        b'{"usage": {"prompt_tokens": 1',
        b"null",
        b"42",
    ],
)
def test_malformed_bodies(body: bytes):
    for api in ("openai.chat", "anthropic.messages", "gemini.generate"):
        assert usage_from_json(api, body) == (None, None)
        stream = read_stream(api, body, chunk=7)
        assert stream.result() == (None, None)


RESPONSE_USAGE = {
    "input_tokens": 2000,
    "input_tokens_details": {"cached_tokens": 1500},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 256},
    "total_tokens": 2300,
}


def responses_stream(terminal: str, **response: Any) -> bytes:
    base = {"id": "resp_1", "object": "response", "model": "gpt-5-2025-08-07", "usage": None}
    return sse(
        (
            "response.created",
            {
                "type": "response.created",
                "sequence_number": 0,
                "response": {**base, "status": "in_progress"},
            },
        ),
        (
            "response.output_text.delta",
            {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hello"},
        ),
        (terminal, {"type": terminal, "sequence_number": 2, "response": {**base, **response}}),
    )


EXPECTED_RESPONSE_RECORD = UsageRecord(
    input_tokens=500, output_tokens=300, cache_read_tokens=1500, reasoning_tokens=256
)


@pytest.mark.parametrize("collect_text", [True, False])
def test_responses_incomplete(collect_text: bool):
    body = responses_stream(
        "response.incomplete",
        status="incomplete",
        incomplete_details={"reason": "max_output_tokens"},
        usage=RESPONSE_USAGE,
    )
    stream = read_stream("openai.responses", body, collect_text=collect_text)
    assert stream.result() == (EXPECTED_RESPONSE_RECORD, "gpt-5-2025-08-07")
    assert stream.done and stream.error is None
    assert stream.text_chars == (5 if collect_text else 0)


@pytest.mark.parametrize("collect_text", [True, False])
def test_responses_failed(collect_text: bool):
    error = {"code": "server_error", "message": "The model failed to generate a response."}
    body = responses_stream("response.failed", status="failed", error=error, usage=RESPONSE_USAGE)
    stream = read_stream("openai.responses", body, collect_text=collect_text)
    assert stream.result() == (EXPECTED_RESPONSE_RECORD, "gpt-5-2025-08-07")
    assert stream.done
    assert stream.error == error


def test_responses_error_event():
    body = sse(
        (
            "error",
            {
                "type": "error",
                "code": "ERR_SOMETHING",
                "message": "Something went wrong",
                "param": None,
                "sequence_number": 1,
            },
        )
    )
    stream = read_stream("openai.responses", body, collect_text=False)
    assert stream.result() == (None, None)
    assert stream.error is not None and stream.error["code"] == "ERR_SOMETHING"
    assert not stream.done


def chat_json(usage: Any) -> bytes:
    return json.dumps({"id": "x", "model": "m", "choices": [], "usage": usage}).encode()


@pytest.mark.parametrize(
    "bad",
    [-1, "12", 1.5, float("nan"), float("inf"), 10**9 + 1, 10**30, True, [1], {"n": 1}],
    ids=repr,
)
def test_bad_numbers_make_the_usage_absent(bad: Any):
    for field in ("prompt_tokens", "completion_tokens"):
        usage = {"prompt_tokens": 10, "completion_tokens": 5, field: bad}
        assert usage_from_json("openai.chat", chat_json(usage)) == (None, "m")
    nested = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": bad},
    }
    assert usage_from_json("openai.chat", chat_json(nested)) == (None, "m")
    gemini = json.dumps({"usageMetadata": {"promptTokenCount": 3, "thoughtsTokenCount": bad}})
    assert usage_from_json("gemini.generate", gemini.encode()) == (None, None)
    stream = read_stream("openai.chat", sse((None, json.loads(chat_json(usage))), (None, "[DONE]")))
    assert stream.result() == (None, "m")


def test_integral_floats_and_unknown_fields_are_accepted():
    usage = {"prompt_tokens": 10.0, "completion_tokens": 5, "surprise": {"x": -1}, "cost": 0.5}
    record, _ = usage_from_json("openai.chat", chat_json(usage))
    assert record == UsageRecord(input_tokens=10, output_tokens=5)


def test_usage_without_any_count_is_absent():
    assert usage_from_json("openai.chat", chat_json({"total_tokens": 7})) == (None, "m")
    assert usage_from_json("openai.chat", chat_json(None)) == (None, "m")


def test_deepseek_cache_hit_tokens_without_details():
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 9,
        "prompt_cache_hit_tokens": 60,
        "prompt_cache_miss_tokens": 40,
    }
    record, _ = usage_from_json("openai.chat", chat_json(usage))
    assert record == UsageRecord(input_tokens=40, output_tokens=9, cache_read_tokens=60)


def test_openrouter_cache_write_is_taken_out_of_input():
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 10,
        "prompt_tokens_details": {"cached_tokens": 200, "cache_write_tokens": 300},
    }
    record, _ = usage_from_json("openai.chat", chat_json(usage))
    assert record == UsageRecord(
        input_tokens=500, output_tokens=10, cache_read_tokens=200, cache_write_tokens=300
    )


def test_inconsistent_cached_count_clamps_input_at_zero():
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 50},
    }
    record, _ = usage_from_json("openai.chat", chat_json(usage))
    assert record is not None and record.input_tokens == 0 and record.cache_read_tokens == 50


def test_embeddings_have_no_output():
    body = json.dumps(
        {
            "object": "list",
            "data": [],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 8},
        }
    )
    assert usage_from_json("openai.embeddings", body.encode()) == (
        UsageRecord(input_tokens=8),
        "text-embedding-3-small",
    )


def test_gemini_tool_use_prompt_is_input_and_thoughts_are_output():
    metadata = {
        "promptTokenCount": 100,
        "cachedContentTokenCount": 40,
        "candidatesTokenCount": 7,
        "thoughtsTokenCount": 20,
        "toolUsePromptTokenCount": 500,
        "totalTokenCount": 627,
    }
    record, model = usage_from_json(
        "gemini.generate", json.dumps({"usageMetadata": metadata, "modelVersion": "g"}).encode()
    )
    assert model == "g"
    assert record == UsageRecord(
        input_tokens=560, output_tokens=27, cache_read_tokens=40, reasoning_tokens=20
    )
    assert record.total_tokens == metadata["totalTokenCount"]


def gemini_chunk(text: str, candidates: int, finish: bool = False) -> dict[str, Any]:
    candidate: dict[str, Any] = {
        "content": {"parts": [{"text": text}], "role": "model"},
        "index": 0,
    }
    if finish:
        candidate["finishReason"] = "STOP"
    return {
        "candidates": [candidate],
        "usageMetadata": {
            "promptTokenCount": 9,
            "candidatesTokenCount": candidates,
            "totalTokenCount": 9 + candidates,
        },
        "modelVersion": "gemini-2.5-flash",
    }


GEMINI_CHUNKS = [gemini_chunk("Hello [", 2), gemini_chunk(' "world" \\o/ ✓', 6, finish=True)]
GEMINI_RECORD = UsageRecord(input_tokens=9, output_tokens=6)


@pytest.mark.parametrize("chunk", [1, 3, 64, 10_000])
def test_gemini_json_array_stream(chunk: int):
    body = (
        json.dumps(GEMINI_CHUNKS, indent=2, ensure_ascii=False).replace("\n}", "\n}\n\r").encode()
    )
    assert usage_from_json("gemini.generate", body) == (GEMINI_RECORD, "gemini-2.5-flash")
    for collect_text in (True, False):
        stream = read_stream("gemini.generate", body, collect_text=collect_text, chunk=chunk)
        assert stream.result() == (GEMINI_RECORD, "gemini-2.5-flash")
        assert stream.done
        assert stream.text_chars == (len("Hello [" + ' "world" \\o/ ✓') if collect_text else 0)


def test_gemini_json_array_truncated_keeps_last_complete_usage():
    body = json.dumps(GEMINI_CHUNKS).encode()
    stream = read_stream("gemini.generate", body[: len(body) - 40])
    record, _ = stream.result()
    assert record == UsageRecord(input_tokens=9, output_tokens=2)
    assert not stream.done


def test_gemini_sse_error_chunk():
    body = sse(
        (None, GEMINI_CHUNKS[0]),
        (None, {"error": {"code": 500, "status": "INTERNAL", "message": "Internal error"}}),
    )
    stream = read_stream("gemini.generate", body.replace(b"\n", b"\r\n"), collect_text=False)
    assert stream.result() == (UsageRecord(input_tokens=9, output_tokens=2), "gemini-2.5-flash")
    assert stream.error == {"code": 500, "status": "INTERNAL", "message": "Internal error"}
    assert not stream.done


def chat_chunk(content: str | None, usage: Any = None) -> dict[str, Any]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "gpt-4o",
        "choices": choices,
        "usage": usage,
    }


def test_prefilter_skips_decoding_events_that_cannot_carry_usage(monkeypatch: pytest.MonkeyPatch):
    usage = {"prompt_tokens": 5, "completion_tokens": 1000}
    body = sse(
        *[(None, chat_chunk("tok ")) for _ in range(1000)],
        (None, chat_chunk(None, usage)),
        (None, "[DONE]"),
    )
    decoded: list[bytes] = []
    real_loads = usage_module._loads

    def counting_loads(data: bytes) -> Any:
        decoded.append(data)
        return real_loads(data)

    monkeypatch.setattr(usage_module, "_loads", counting_loads)

    stream = read_stream("openai.chat", body, collect_text=False, chunk=4096)
    assert stream.result() == (UsageRecord(input_tokens=5, output_tokens=1000), "gpt-4o")
    assert stream.done
    assert len(decoded) == 2  # the first chunk (for the model) and the usage chunk

    decoded.clear()  # counting the text does not decode either
    stream = read_stream("openai.chat", body, collect_text=True, chunk=4096)
    assert stream.result() == (UsageRecord(input_tokens=5, output_tokens=1000), "gpt-4o")
    assert stream.text_chars == 4000
    assert len(decoded) == 2

    decoded.clear()  # keeping it (the contentview) does
    stream = read_stream("openai.chat", body, keep_text=True, chunk=4096)
    assert stream.text is not None and "".join(stream.text) == "tok " * 1000
    assert len(decoded) == 1001


def test_truncated_chat_stream():
    body = sse(*[(None, chat_chunk("ab")) for _ in range(3)])
    stream = read_stream("openai.chat", body[:-10])
    assert stream.result() == (None, "gpt-4o")
    assert not stream.done
    assert stream.text_chars == 6  # the third event was cut after its text, which got through


def test_chat_text_counts_reasoning_and_tool_arguments():
    chunk = {
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"reasoning_content": "abc", "content": None}},
            {
                "index": 1,
                "delta": {
                    "reasoning": "de",
                    "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"x":'}}],
                },
            },
            "not a choice",
        ],
    }
    stream = read_stream("openai.chat", sse((None, chunk)))
    assert stream.text_chars == 3 + 2 + 5


def test_oversize_event_does_not_hide_usage():
    usage = {"prompt_tokens": 5, "completion_tokens": 7}
    body = sse((None, chat_chunk("x" * 5000)), (None, chat_chunk(None, usage)), (None, "[DONE]"))
    stream = read_stream("openai.chat", body, max_event_bytes=1000, chunk=300)
    assert stream.result() == (UsageRecord(input_tokens=5, output_tokens=7), "gpt-4o")
    assert stream.overflows == 1
    assert stream.text_chars == 0


@pytest.mark.parametrize(
    "data",
    [
        {"type": ["x"], "usage": "lots"},
        {"choices": "nope", "usage": [], "x_groq": {"usage": 5}, "model": 7},
        {"choices": [{"delta": {"content": 5, "tool_calls": {"a": 1}}}], "error": "bad"},
        {"type": "message_start", "message": {"usage": None}},
        {"type": "message_delta", "usage": [1, 2]},
        {"type": "response.completed", "response": "done"},
        {"candidates": [{"content": {"parts": "p"}}, 3], "usageMetadata": [0]},
        [1, 2, 3],
        "string",
    ],
)
def test_odd_shapes_never_raise(data: Any):
    body = sse((None, data), ("message_delta", data), ("response.completed", data))
    for api in ("openai.chat", "openai.responses", "anthropic.messages", "gemini.generate"):
        for collect_text in (True, False):
            stream = read_stream(api, body, collect_text=collect_text, chunk=3)
            record, _ = stream.result()
            assert record is None


def test_random_garbage_never_raises():
    rng = random.Random(3)
    for api in ("openai.chat", "anthropic.messages", "gemini.generate"):
        garbage = bytes(rng.randrange(256) for _ in range(20_000))
        for prefix in (b"", b"[", b"data: "):
            stream = read_stream(api, prefix + garbage, chunk=rng.randint(1, 500))
            assert stream.result()[0] is None


def test_unknown_api():
    with pytest.raises(ValueError, match="unknown api"):
        StreamUsage("cohere.chat")


def test_a_broken_string_in_a_text_event_neither_stops_the_stream_nor_hides_its_usage():
    usage = {"prompt_tokens": 5, "completion_tokens": 7}
    broken = r'{"model": "gpt-4o", "choices": [{"delta": {"content": "ab\x"}}], "usage": null}'
    body = sse((None, chat_chunk("hi")), (None, broken), (None, chat_chunk(None, usage)))
    stream = read_stream("openai.chat", body, chunk=len(body))  # all in one chunk
    assert stream.result() == (UsageRecord(input_tokens=5, output_tokens=7), "gpt-4o")
    assert stream.text_chars == 2 + len("ab\\x")  # the broken string counts its bytes


def test_text_with_escapes_in_a_long_event_is_counted_exactly():
    text = ('say "hi"\\n\t ✓ ' * 20_000) + "end"
    usage = {"prompt_tokens": 1, "completion_tokens": 2}
    body = sse((None, chat_chunk("x")), (None, chat_chunk(text)), (None, chat_chunk(None, usage)))
    stream = read_stream("openai.chat", body, chunk=65536)
    assert stream.result()[0] == UsageRecord(input_tokens=1, output_tokens=2)
    assert stream.text_chars == 1 + len(text)


# -- billed classes beyond the token counts -------------------------------------------------
def test_openai_audio_and_image_parts_less_their_cached_part() -> None:
    body = {
        "model": "gpt-4o-audio-preview",
        "service_tier": "priority",
        "usage": {
            "prompt_tokens": 1_000,
            "completion_tokens": 300,
            "prompt_tokens_details": {
                "cached_tokens": 200,
                "audio_tokens": 400,
                "image_tokens": 100,
                "cached_tokens_details": {"audio_tokens": 150},
            },
            "completion_tokens_details": {"audio_tokens": 120, "reasoning_tokens": 10},
        },
    }
    record, _ = usage_from_json("openai.chat", json.dumps(body).encode())
    assert record == UsageRecord(
        input_tokens=800,
        cache_read_tokens=200,
        output_tokens=300,
        reasoning_tokens=10,
        input_audio_tokens=250,
        input_image_tokens=100,
        cache_audio_read_tokens=150,
        output_audio_tokens=120,
        service_tier="priority",
    )


def test_gemini_modalities_in_and_out() -> None:
    usage = {
        "promptTokenCount": 3_000,
        "cachedContentTokenCount": 1_000,
        "candidatesTokenCount": 1_300,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 1_000},
            {"modality": "AUDIO", "tokenCount": 1_500},
            {"modality": "IMAGE", "tokenCount": 500},
        ],
        "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 1_000}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1_290}],
    }
    record, _ = usage_from_json("gemini.generate", json.dumps({"usageMetadata": usage}).encode())
    assert record is not None
    assert (record.input_tokens, record.input_audio_tokens, record.input_image_tokens) == (
        2_000,
        500,
        500,
    )
    assert (record.cache_read_tokens, record.cache_audio_read_tokens) == (1_000, 1_000)
    assert (record.output_tokens, record.output_image_tokens) == (1_300, 1_290)


def test_parts_larger_than_their_whole_are_clamped() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "prompt_tokens_details": {"audio_tokens": 10_000},
        "completion_tokens_details": {"audio_tokens": 9, "image_tokens": 9},
    }
    record, _ = usage_from_json("openai.chat", json.dumps({"usage": usage}).encode())
    assert record is not None
    assert (record.input_audio_tokens, record.output_audio_tokens) == (10, 5)
    assert record.output_image_tokens == 0


@pytest.mark.parametrize("bad", [-1, "12", 1.5, 10**10, None])
def test_a_bad_modality_count_makes_the_usage_absent(bad: Any) -> None:
    details = [{"modality": "AUDIO", "tokenCount": bad}]
    usage = {"promptTokenCount": 10, "candidatesTokenCount": 1, "promptTokensDetails": details}
    record, _ = usage_from_json("gemini.generate", json.dumps({"usageMetadata": usage}).encode())
    assert (record is None) == (bad is not None)


@pytest.mark.parametrize(
    ("tier", "kept"),
    [("priority", "priority"), ("flex", "flex"), ("PRIORITY", None), ("x" * 40, None), (7, None)],
)
def test_only_a_plausible_service_tier_is_kept(tier: Any, kept: str | None) -> None:
    body = {"service_tier": tier, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    record, _ = usage_from_json("openai.chat", json.dumps(body).encode())
    assert record is not None and record.service_tier == kept


def test_chat_stream_service_tier_and_responses_tool_calls() -> None:
    chunk = {"choices": [], "service_tier": "flex", "usage": {"prompt_tokens": 3}}
    stream = read_stream("openai.chat", sse((None, chunk), (None, "[DONE]")))
    assert stream.result()[0] == UsageRecord(input_tokens=3, service_tier="flex")
    output = [{"type": "web_search_call"}] * 3 + [{"type": "code_interpreter_call"}]
    response = {"output": output, "usage": {"input_tokens": 5, "output_tokens": 2}}
    body = sse(("response.completed", {"type": "response.completed", "response": response}))
    record = read_stream("openai.responses", body).result()[0]
    assert record is not None
    assert (record.web_search_requests, record.code_executions) == (3, 1)


@pytest.mark.parametrize(
    ("model", "uses"), [("gemini-2.5-pro", 1), ("gemini-3-pro-preview", 2), ("gemini-10", 2)]
)
def test_gemini_grounding_per_prompt_then_per_query(model: str, uses: int) -> None:
    grounding = {"webSearchQueries": ["a", "b", "a"], "groundingChunks": [{"web": {}}]}
    chunk = {
        "candidates": [{"finishReason": "STOP", "groundingMetadata": grounding}],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 1},
        "modelVersion": model,
    }
    record = read_stream("gemini.generate", sse((None, chunk)), collect_text=False).result()[0]
    assert record is not None and record.web_search_requests == uses
    # URL context leaves grounding chunks but runs no search: no fee
    del grounding["webSearchQueries"]
    record = read_stream("gemini.generate", sse((None, chunk))).result()[0]
    assert record is not None and record.web_search_requests == 0


def test_anthropic_web_searches_from_the_final_delta() -> None:
    start = {"type": "message_start", "message": {"model": "m", "usage": {"input_tokens": 9}}}
    delta = {
        "type": "message_delta",
        "usage": {"output_tokens": 4, "server_tool_use": {"web_search_requests": 20}},
    }
    body = sse(("message_start", start), ("message_delta", delta), ("message_stop", {}))
    record = read_stream("anthropic.messages", body).result()[0]
    assert record is not None and record.web_search_requests == 20


@settings(deadline=None)  # no timing asserted: a loaded machine is slow
@given(st.lists(st.text(max_size=20), max_size=5), st.booleans())
def test_text_chars_without_decoding_are_what_decoding_counts(texts: list[str], ascii_only: bool):
    literals = [
        json.dumps(text, ensure_ascii=ascii_only)[1:-1].encode("utf-8", "surrogatepass")
        for text in texts
    ]
    assert usage_module._text_chars(literals) == sum(map(len, texts))
    broken = [*literals, b"ab\\x"]  # a broken escape counts its bytes, the others their text
    assert usage_module._text_chars(broken) == sum(map(len, texts)) + 4
