from __future__ import annotations

from typing import Any

import pytest

from addons.outputcap import cap_output


@pytest.mark.parametrize(
    ("api", "body", "capped"),
    [
        ("openai.chat", {}, {"max_completion_tokens": 100}),
        ("openai.chat", {"max_tokens": 500}, {"max_tokens": 100}),
        (
            "openai.chat",
            {"max_tokens": 500, "max_completion_tokens": 50},
            {"max_tokens": 100, "max_completion_tokens": 50},
        ),
        ("openai.chat", {"max_tokens": None}, {"max_tokens": None, "max_completion_tokens": 100}),
        ("openai.responses", {"max_output_tokens": 101}, {"max_output_tokens": 100}),
        ("anthropic.messages", {}, {"max_tokens": 100}),
        ("gemini.generate", {}, {"generationConfig": {"maxOutputTokens": 100}}),
        (
            "gemini.generate",
            {"generationConfig": {"temperature": 1}},
            {"generationConfig": {"temperature": 1, "maxOutputTokens": 100}},
        ),
        (
            "gemini.generate",
            {"generation_config": {"max_output_tokens": 900}},
            {"generation_config": {"max_output_tokens": 100}},
        ),
    ],
)
def test_the_limit_each_api_reads_is_capped(
    api: str, body: dict[str, Any], capped: dict[str, Any]
) -> None:
    assert cap_output(api, body, 100) is True
    assert body == capped


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("openai.chat", {"max_completion_tokens": 100}),
        ("anthropic.messages", {"max_tokens": 7}),
        ("gemini.generate", {"generationConfig": {"maxOutputTokens": 99}}),
        ("openai.embeddings", {"input": "x"}),
        ("gemini.embed", {}),
    ],
)
def test_a_lower_limit_stays_and_embeddings_are_left_alone(api: str, body: dict[str, Any]) -> None:
    before = dict(body)
    assert cap_output(api, body, 100) is False
    assert body == before
