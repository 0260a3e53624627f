import dataclasses
import functools
import json
import re
import statistics
from decimal import Decimal

import pytest
from corpus import SKIP_REASON
from corpus import load_cases
from genai_prices.types import ModelPrice
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from burnmeter.config import parse_config
from burnmeter.estimate import ANTHROPIC_TOOL_PROMPT_TOKENS
from burnmeter.estimate import AUDIO_TOKENS
from burnmeter.estimate import FILE_TOKENS
from burnmeter.estimate import MAX_NESTING
from burnmeter.estimate import SERVER_TOOL_TOKENS
from burnmeter.estimate import UPSTREAM_PROMPT_TOKENS
from burnmeter.estimate import RequestEstimate
from burnmeter.estimate import estimate_input_tokens
from burnmeter.estimate import estimate_output_tokens
from burnmeter.estimate import estimate_request
from burnmeter.estimate import held_usage
from burnmeter.estimate import hold_amounts
from burnmeter.estimate import output_tokens_paid
from burnmeter.pricing import resolve_price

CONFIG = parse_config(
    {
        "default_max_output_tokens": 1000,
        "models": {
            "claude-sonnet-4-5-20250929": {
                "input": 3,
                "output": 14,
                "cache_write": 3.75,
                "cache_read": 0.3,
            },
            "big-output": {"input": 1, "output": 2, "max_output_tokens": 64000},
        },
    }
)


def estimate(api: str, body: object, path: str = "") -> RequestEstimate:
    return estimate_request(api, body, CONFIG, path)


def tokens(api: str, body: object) -> int:
    return estimate_input_tokens(api, body)


def user(content: object) -> dict[str, object]:
    return {"role": "user", "content": content}


def test_openai_chat_text() -> None:
    # "user" + 40 chars = 44 chars = 11 tokens, plus 4 for the message.
    assert tokens("openai.chat", {"messages": [user("x" * 40)]}) == 15
    two = {"messages": [{"role": "system", "content": "abcd"}, user("x" * 40)]}
    assert tokens("openai.chat", two) == 14 + 8  # 10 + 44 chars, then 4 per message


def test_tool_calls_and_tools_count() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"function": {"name": "f", "arguments": "y" * 400}}],
    }
    assert tokens("openai.chat", {"messages": [call]}) > 100
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"d": "z" * 400}}}]
    with_tools = tokens("openai.chat", {"messages": [user("hi")], "tools": tools})
    assert with_tools - tokens("openai.chat", {"messages": [user("hi")]}) > 100


def test_anthropic_system_messages_and_tool_prompt() -> None:
    body = {"system": "s" * 8, "messages": [user([{"type": "text", "text": "t" * 40}])]}
    # 8 + "user" + "text" + 40 = 56 chars = 14 tokens, plus 4.
    assert tokens("anthropic.messages", body) == 18
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    tool_chars = len(json.dumps(tools, separators=(",", ":")))
    with_tools = tokens("anthropic.messages", {**body, "tools": tools})
    assert with_tools == -(-(56 + tool_chars) // 4) + 4 + ANTHROPIC_TOOL_PROMPT_TOKENS


def test_responses_input_and_instructions() -> None:
    assert tokens("openai.responses", {"input": "x" * 40, "instructions": "y" * 4}) == 11 + 4
    items = [user([{"type": "input_text", "text": "x" * 36}]), {"type": "function_call_output"}]
    # "user" + "input_text" + 36 + "function_call_output" = 70 chars.
    assert tokens("openai.responses", {"input": items}) == 18 + 8


def test_embeddings() -> None:
    assert tokens("openai.embeddings", {"input": "x" * 40}) == 10
    assert tokens("openai.embeddings", {"input": ["x" * 40, "y" * 40]}) == 20
    assert tokens("openai.embeddings", {"input": [1, 2, 3]}) == 3
    assert tokens("openai.embeddings", {"input": [[1, 2], [3]]}) == 3
    gemini = {"requests": [{"content": {"parts": [{"text": "x" * 40}]}}]}
    assert tokens("gemini.embed", gemini) == 10
    assert tokens("gemini.embed", {"content": {"parts": [{"text": "x" * 40}]}}) == 10
    assert estimate("openai.embeddings", {"input": "x"}).max_output_tokens == 0
    assert estimate("gemini.embed", gemini).max_output_tokens == 0


def test_gemini_contents_and_system_instruction() -> None:
    body = {
        "systemInstruction": {"parts": [{"text": "s" * 8}]},
        "contents": [{"role": "user", "parts": [{"text": "x" * 36}]}],
    }
    assert tokens("gemini.generate", body) == 12 + 4  # 8 + "user" + 36 = 48 chars
    snake = {"system_instruction": body["systemInstruction"], "contents": body["contents"]}
    assert tokens("gemini.generate", snake) == 16


def test_images_count_flat_whatever_their_size() -> None:
    big = "data:image/png;base64," + "A" * 1_000_000
    openai_image = {"type": "image_url", "image_url": {"url": big}}
    assert tokens("openai.chat", {"messages": [user([openai_image])]}) == 1 + 765 + 4
    low = {"type": "image_url", "image_url": {"url": big, "detail": "low"}}
    assert tokens("openai.chat", {"messages": [user([low])]}) == 1 + 85 + 4
    responses_image = {"type": "input_image", "image_url": big}
    assert tokens("openai.responses", {"input": [user([responses_image])]}) == 1 + 765 + 4
    anthropic_image = {"type": "image", "source": {"type": "base64", "data": "A" * 10**6}}
    assert tokens("anthropic.messages", {"messages": [user([anthropic_image])]}) == 1 + 1600 + 4
    gemini_image = {"inlineData": {"mimeType": "image/png", "data": "A" * 10**6}}
    gemini = {"contents": [{"role": "user", "parts": [gemini_image]}]}
    assert tokens("gemini.generate", gemini) == 1 + 258 + 4


def test_audio_files_and_text_documents() -> None:
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 10**6, "format": "wav"}}
    assert tokens("openai.chat", {"messages": [user([audio])]}) == 1 + AUDIO_TOKENS + 4
    pdf = {"type": "document", "source": {"type": "base64", "data": "A" * 10**6}}
    assert tokens("anthropic.messages", {"messages": [user([pdf])]}) == 1 + FILE_TOKENS + 4
    text = {"type": "document", "source": {"type": "text", "data": "x" * 400}}
    assert 100 < tokens("anthropic.messages", {"messages": [user([text])]}) < 120
    # Gemini inline text/plain is base64 text: 400 chars encode 300 bytes = 75 tokens.
    inline = {"inlineData": {"mimeType": "text/plain", "data": "A" * 400}}
    video = {"fileData": {"mimeType": "video/mp4", "fileUri": "gs://x"}}
    gemini = {"contents": [{"role": "user", "parts": [inline, video]}]}
    assert tokens("gemini.generate", gemini) == 1 + 75 + FILE_TOKENS + 4


def test_max_output_tokens() -> None:
    assert estimate("openai.chat", {"max_tokens": 50}).max_output_tokens == 50
    both = {"max_tokens": 50, "max_completion_tokens": 70, "n": 3}
    assert estimate("openai.chat", both).max_output_tokens == 210
    assert estimate("anthropic.messages", {"max_tokens": 8192}).max_output_tokens == 8192
    assert estimate("openai.responses", {"max_output_tokens": 99}).max_output_tokens == 99
    gen = {"generationConfig": {"maxOutputTokens": 40, "candidateCount": 2}}
    assert estimate("gemini.generate", gen).max_output_tokens == 80
    assert estimate("openai.chat", {"max_tokens": None}).max_output_tokens == 1000
    assert estimate("gemini.generate", {}).max_output_tokens == 1000


def test_stream_flag() -> None:
    assert estimate("openai.chat", {"stream": True}).stream
    assert not estimate("openai.chat", {"stream": False}).stream
    assert not estimate("anthropic.messages", {"stream": None}).stream
    assert not estimate("openai.responses", {}).stream
    stream_path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert estimate("gemini.generate", {}, stream_path).stream
    assert not estimate("gemini.generate", {}, "/v1beta/models/x:generateContent").stream


@pytest.mark.parametrize(
    ("api", "body", "message"),
    [
        ("openai.chat", {"max_tokens": -1}, "'max_tokens' must be a positive integer up to"),
        ("openai.chat", {"max_tokens": 10**60}, "'max_tokens' must be a positive integer up to"),
        ("openai.chat", {"max_tokens": 10, "n": 10**10}, "'n' must be a positive integer up to"),
        ("openai.chat", {"max_tokens": 0}, "'max_tokens' must be a positive integer"),
        ("openai.chat", {"max_tokens": 1.5}, "'max_tokens' must be a positive integer"),
        ("openai.chat", {"max_tokens": "100"}, "'max_tokens' must be a positive integer"),
        ("anthropic.messages", {"max_tokens": True}, "'max_tokens' must be a positive integer"),
        ("openai.chat", {"n": 0}, "'n' must be a positive integer"),
        ("openai.chat", {"stream": "yes"}, "'stream' must be true or false, not \"yes\""),
        ("openai.chat", {"stream": 1}, "'stream' must be true or false"),
        ("openai.chat", {"messages": "hi"}, "'messages' must be an array"),
        ("openai.chat", {"messages": ["hi"]}, "each of 'messages' must be an object"),
        ("anthropic.messages", {"system": 5}, "'system' must be a string or an array"),
        ("openai.chat", {"tools": {}}, "'tools' must be an array"),
        ("openai.responses", {"input": {}}, "'input' must be a string or an array"),
        ("gemini.generate", {"contents": {}}, "'contents' must be an array"),
        ("gemini.generate", {"generationConfig": []}, "'generationConfig' must be an object"),
        (
            "gemini.generate",
            {"generationConfig": {"maxOutputTokens": -5}},
            "'maxOutputTokens' must be a positive integer",
        ),
        ("openai.chat", [], "request body must be a JSON object"),
        ("openai.completions", {}, "unknown api 'openai.completions'"),
        (
            "openai.chat",
            {
                "messages": [
                    user(functools.reduce(lambda inner, _: [inner], range(MAX_NESTING), []))
                ]
            },
            f"request JSON is nested deeper than {MAX_NESTING} levels",
        ),
    ],
)
def test_bad_requests(api: str, body: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        estimate(api, body)


def test_cache_markers() -> None:
    plain = {"system": [{"type": "text", "text": "s"}], "messages": [user("hi")]}
    assert estimate("anthropic.messages", plain).cache_ttl is None
    marked = {"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}
    five = {"system": [marked], "messages": [user("hi")]}
    assert estimate("anthropic.messages", five).cache_ttl == "5m"
    # The marker itself is not prompt text.
    assert tokens("anthropic.messages", five) == tokens("anthropic.messages", plain)
    hour = {**marked, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    mixed = {"system": [marked], "messages": [user([hour])]}
    assert estimate("anthropic.messages", mixed).cache_ttl == "1h"
    tool = {"name": "f", "input_schema": {}, "cache_control": {"type": "ephemeral"}}
    tools = {"messages": [user("hi")], "tools": [tool]}
    assert estimate("anthropic.messages", tools).cache_ttl == "5m"
    top = {"messages": [user("hi")], "cache_control": {"type": "ephemeral"}}
    assert estimate("anthropic.messages", top).cache_ttl == "5m"


def test_estimate_output_tokens() -> None:
    assert [estimate_output_tokens(n) for n in (0, 1, 4, 5, 400)] == [0, 1, 1, 2, 100]


def test_hold_amounts() -> None:
    q = resolve_price(CONFIG, "claude-sonnet-4-5-20250929", Decimal("1.02"))
    maximum, minimum = hold_amounts(RequestEstimate(1_000, 500, False), q)
    assert maximum == Decimal("0.0102")  # (1000·3 + 500·14) / 1e6 × 1.02
    assert minimum == Decimal("0.00306")
    cached, cached_input = hold_amounts(RequestEstimate(1_000, 500, False, "5m"), q)
    assert (cached, cached_input) == (Decimal("0.010965"), Decimal("0.003825"))
    hour, hour_input = hold_amounts(RequestEstimate(1_000, 500, False, "1h"), q)
    assert (hour, hour_input) == (Decimal("0.01326"), Decimal("0.00612"))  # 1h at 2x input
    assert hold_amounts(RequestEstimate(0, 0, False), q) == (0, 0)


def reported_prompt_tokens(case: dict[str, object]) -> int | None:
    usage = case["expected_usage"]
    if not isinstance(usage, dict) or usage["input_tokens"] is None:
        return None
    prompt: int = usage["input_tokens"]
    if case["api"] == "anthropic.messages":
        prompt += (usage["cache_read_tokens"] or 0) + (usage["cache_write_tokens"] or 0)
    return prompt


def test_estimator_accuracy_on_corpus() -> None:
    cases = load_cases()
    if not cases:
        pytest.skip(SKIP_REASON)
    ratios = []
    for case in cases.values():
        reported = reported_prompt_tokens(case)
        if reported is None or case["request"]["body"] is None:
            continue
        request = case["request"]
        ratios.append(estimate_input_tokens(case["api"], request["body"]) / reported)
    median_error = statistics.median(abs(r - 1) for r in ratios)
    deciles = statistics.quantiles(ratios, n=10)
    print(
        f"{len(ratios)} cases: median |error| {median_error:.3f}, "
        f"median ratio {statistics.median(ratios):.3f}, p10 {deciles[0]:.3f}, p90 {deciles[-1]:.3f}"
    )
    assert len(ratios) >= 40
    assert median_error < 0.25
    assert deciles[-1] < 1.5


BILLED = parse_config(
    {
        "default_max_output_tokens": 1000,
        "models": {
            "omni": {
                "input": 1,
                "output": 4,
                "input_audio": 10,
                "input_image": 2,
                "output_audio": 20,
                "output_image": 30,
                "web_search": "0.01",
                "tiers": [{"above": 1_000, "input": 2, "output": 6}],
                "service_tiers": {"priority": {"input": 3, "output": 9}},
            }
        },
    }
)
OMNI = resolve_price(BILLED, "omni", Decimal(1))


def held(estimate: RequestEstimate) -> tuple[Decimal, Decimal]:
    return hold_amounts(estimate, OMNI)


def per_million(amount: int | Decimal, fees: Decimal = Decimal(0)) -> Decimal:
    return Decimal(amount) / 1_000_000 + fees


def test_a_hold_whose_estimate_crosses_a_tier_is_at_the_higher_rate() -> None:
    assert held(RequestEstimate(1_000, 100, False)) == (
        per_million(1_000 * 1 + 100 * 4),
        per_million(1_000 * 1),
    )
    assert held(RequestEstimate(1_001, 100, False)) == (
        per_million(1_001 * 2 + 100 * 6),
        per_million(1_001 * 2),
    )


def test_a_hold_prices_media_input_and_the_dearest_output_the_request_allows() -> None:
    body = {
        "contents": [{"parts": [{"inlineData": {"mimeType": "audio/wav", "data": "AAAA"}}]}],
        "generationConfig": {"maxOutputTokens": 100, "responseModalities": ["TEXT", "AUDIO"]},
    }
    spoken = estimate_request("gemini.generate", body, BILLED, "/v1beta/models/omni:x")
    assert spoken.input_audio_tokens == AUDIO_TOKENS
    assert spoken.output_modalities == {"text", "audio"}
    text = spoken.held_input_tokens - AUDIO_TOKENS  # holds pay for the upper bound
    # the prompt (over 1,000 tokens with the clip) is in the tier, its audio at the audio rate
    maximum, minimum = held(spoken)
    assert minimum == per_million(text * 2 + AUDIO_TOKENS * 10)
    assert maximum == minimum + per_million(100 * 20)
    # no responseModalities: the model may answer in any modality it has, images the dearest
    unasked = estimate_request(
        "gemini.generate", {**body, "generationConfig": {"maxOutputTokens": 100}}, BILLED
    )
    assert unasked.output_modalities is None
    assert held(unasked)[0] == minimum + per_million(100 * 30)
    # OpenAI chat answers in audio only when asked to
    chat = {"messages": [user("hi")], "max_tokens": 10}
    assert estimate("openai.chat", chat).output_modalities == {"text"}
    asked = estimate("openai.chat", {**chat, "modalities": ["text", "audio"]})
    assert asked.output_modalities == {"text", "audio"}


@pytest.mark.parametrize(
    ("api", "tool", "path", "uses"),
    [
        ("anthropic.messages", {"type": "web_search_20250305", "name": "web_search"}, "", 10),
        (
            "anthropic.messages",
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
            "",
            3,
        ),
        ("openai.responses", {"type": "web_search"}, "", 10),
        ("openai.responses", {"type": "web_search_preview"}, "", 10),
        ("gemini.generate", {"google_search": {}}, "/v1beta/models/gemini-2.5-pro:x", 1),
        ("gemini.generate", {"googleSearchRetrieval": {}}, "/v1beta/models/gemini-2.0:x", 1),
        ("gemini.generate", {"google_search": {}}, "/v1beta/models/gemini-3-pro:x", 10),
        ("anthropic.messages", {"type": "bash_20250124", "name": "bash"}, "", 0),
        ("gemini.generate", {"urlContext": {}}, "/v1beta/models/gemini-2.5-pro:x", 0),
    ],
)
def test_server_tools_hold_their_fees_for_the_uses_allowed(
    api: str, tool: dict[str, object], path: str, uses: int
) -> None:
    body: dict[str, object] = {"tools": [tool], "max_tokens": 10}
    if api == "anthropic.messages":
        body["messages"] = [user("hi")]
    estimate = estimate_request(api, body, BILLED, path)
    assert estimate.server_tool_uses.get("web_search_requests", 0) == uses
    without = dataclasses.replace(estimate, server_tool_uses={})
    assert held(estimate)[0] - held(without)[0] == uses * Decimal("0.01")


def test_a_hold_is_at_the_service_tier_asked_for() -> None:
    body = {"messages": [user("hi")], "max_tokens": 10}
    asked = estimate("openai.chat", {**body, "service_tier": "priority"})
    assert asked.service_tier == "priority"
    assert estimate("openai.chat", {**body, "service_tier": "auto"}).service_tier is None
    maximum, minimum = held(asked)
    assert minimum == per_million(asked.held_input_tokens * 3)
    assert maximum == minimum + per_million(10 * 9)


# -- the upper bound holds pay for ---------------------------------------------------------
SCRIPTS = {
    "latin": (0x20, 0x7E),
    "cjk": (0x4E00, 0x9FFF),
    "hangul": (0xAC00, 0xD7A3),
    "devanagari": (0x0900, 0x097F),
    "arabic": (0x0600, 0x06FF),
    "cyrillic": (0x0400, 0x04FF),
    "thai": (0x0E00, 0x0E7F),
    "emoji": (0x1F300, 0x1FAFF),
    "any": (0, 0x10FFFF),
}


@settings(max_examples=200)
@given(
    st.sampled_from(sorted(SCRIPTS)).flatmap(
        lambda script: st.text(
            st.characters(
                min_codepoint=SCRIPTS[script][0],
                max_codepoint=SCRIPTS[script][1],
                codec=None,
                exclude_categories=(),
            ),
            min_size=1,
        )
    ),
    st.sampled_from(["openai.chat", "anthropic.messages", "openai.responses", "gemini.generate"]),
)
def test_the_upper_bound_covers_any_byte_level_tokenizer_in_any_script(text: str, api: str) -> None:
    """No byte-level BPE (GPT, Claude) or byte-fallback SentencePiece (Gemini) makes more
    tokens of a text than its UTF-8 bytes; chars/4 undercounts CJK ~6x, emoji more."""
    if api == "gemini.generate":
        body: dict[str, object] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    elif api == "openai.responses":
        body = {"input": text}
    else:
        body = {"messages": [user(text)]}
    estimate = estimate_request(api, body, CONFIG)
    assert estimate.held_input_tokens >= len(text.encode("utf-8", "surrogatepass"))
    assert estimate.held_input_tokens >= estimate_input_tokens(api, body)


def test_the_upper_bound_covers_every_reported_prompt_in_the_corpus() -> None:
    cases = load_cases()
    if not cases:
        pytest.skip(SKIP_REASON)
    checked = 0
    for name, case in cases.items():
        reported = reported_prompt_tokens(case)
        if reported is None or case["request"]["body"] is None:
            continue
        request = case["request"]
        estimated = estimate_request(case["api"], request["body"], CONFIG, request["path"])
        assert estimated.held_input_tokens >= reported, name
        checked += 1
    assert checked >= 40


def test_the_upper_bound_allows_for_server_tools_and_the_upstreams_own_prompt() -> None:
    plain = estimate("anthropic.messages", {"messages": [user("hi")]})
    assert plain.held_input_tokens == len("user") + len("hi") + 4 + UPSTREAM_PROMPT_TOKENS
    search = {"messages": [user("hi")], "tools": [{"type": "web_search_20250305", "name": "w"}]}
    with_search = estimate("anthropic.messages", search)
    assert with_search.held_input_tokens > plain.held_input_tokens + SERVER_TOOL_TOKENS
    responses = {"input": "hi", "tools": [{"type": "web_search_preview"}]}
    assert estimate("openai.responses", responses).held_input_tokens > SERVER_TOOL_TOKENS


def test_a_request_without_an_output_limit_is_held_for_its_models_maximum() -> None:
    body = {"messages": [user("hi")]}
    assert estimate_request("openai.chat", body, CONFIG, model="big-output").max_output_tokens == (
        64000
    )
    assert estimate_request("openai.chat", body, CONFIG, model="unknown").max_output_tokens == 1000
    limited = {**body, "max_tokens": 10}
    assert estimate_request(
        "openai.chat", limited, CONFIG, model="big-output"
    ).max_output_tokens == (10)


def test_output_tokens_paid_by_a_partial_hold() -> None:
    q = resolve_price(CONFIG, "claude-sonnet-4-5-20250929", Decimal(1))
    e = RequestEstimate(2_000, 1_000, False, choices=2)
    maximum, minimum = hold_amounts(e, q)
    assert minimum == Decimal("0.006")  # the upper bound of the input is held: 2000 x 3
    assert output_tokens_paid(e, q, maximum, maximum) == 500
    assert output_tokens_paid(e, q, maximum * 2, maximum) == 500
    # 0.0074 - 0.006 pays 100 output tokens at 14 per million: 50 per choice
    assert output_tokens_paid(e, q, Decimal("0.0074"), maximum) == 50
    assert output_tokens_paid(e, q, minimum, maximum) == 1, (
        "one token at least: a limit of 0 is invalid"
    )
    assert held_usage(e, q).input_tokens == 2_000


def test_a_full_hold_pays_for_the_whole_limit_without_pricing_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q = resolve_price(CONFIG, "claude-sonnet-4-5-20250929", Decimal(1))
    e = RequestEstimate(2_000, 1_000, False, choices=2)
    maximum, _ = hold_amounts(e, q)
    calls = []
    calc_price = ModelPrice.calc_price
    monkeypatch.setattr(
        ModelPrice,
        "calc_price",
        lambda price, usage: calls.append(usage) or calc_price(price, usage),
    )
    assert output_tokens_paid(e, q, maximum, maximum) == 500
    assert calls == []
    assert output_tokens_paid(e, q, maximum - Decimal("0.000014"), maximum) == 499
    assert calls, "a partial hold is priced"
