"""The fake upstream, hit directly with the official SDKs (fast: no proxy)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from scripts.fake_upstream import prompt_tokens
from scripts.fake_upstream import serve_in_thread

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello in five words."}]


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_in_thread() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def stats(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=5) as client:
        client.post("/__reset").raise_for_status()
        yield client


def oa(base: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=base + "/v1", api_key="sk-x", default_headers=headers, max_retries=0
    )


def an(base: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key="sk-x", max_retries=0)


def test_chat_json_usage_is_deterministic(base: str) -> None:
    r = oa(base).chat.completions.create(
        model="fake-gpt", messages=MESSAGES, extra_body={"x_chunks": 4, "x_cache_read": 3}
    )
    assert r.choices[0].message.content == "tok0 tok1 tok2 tok3 "
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens(MESSAGES) + 3
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens == 3
    assert r.usage.completion_tokens == 4


def test_chat_stream_usage_only_with_include_usage(base: str) -> None:
    client = oa(base)
    plain = list(client.chat.completions.create(model="fake-gpt", messages=MESSAGES, stream=True))
    assert all(c.usage is None for c in plain)
    assert (
        "".join(c.choices[0].delta.content or "" for c in plain if c.choices) == "tok0 tok1 tok2 "
    )
    chunks = list(
        client.chat.completions.create(
            model="fake-gpt",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"x_chunks": 5, "x_split": 3},
        )
    )
    usages = [c.usage for c in chunks if c.usage is not None]
    assert len(usages) == 1 and chunks[-1].choices == []
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (prompt_tokens(MESSAGES), 5)


def test_responses_stream_and_json(base: str) -> None:
    client = oa(base)
    r = client.responses.create(model="fake-gpt", input="hello there", extra_body={"x_chunks": 2})
    assert r.output_text == "tok0 tok1 "
    assert r.usage is not None and r.usage.input_tokens == prompt_tokens("hello there")
    events = list(client.responses.create(model="fake-gpt", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.output_tokens == 3


def test_embeddings_and_models(base: str) -> None:
    client = oa(base)
    e = client.embeddings.create(model="fake-embed", input=["a", "b"])
    assert len(e.data) == 2 and e.data[0].embedding == [0.5, -0.25, 0.125]
    assert e.usage.prompt_tokens == prompt_tokens(["a", "b"])
    assert "fake-gpt" in [m.id for m in client.models.list()]


def test_anthropic_stream_reports_cache_fields(base: str) -> None:
    with an(base).messages.stream(
        model="fake-claude",
        max_tokens=64,
        messages=MESSAGES,
        extra_body={"x_chunks": 6, "x_cache_read": 10, "x_cache_write": 20},
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text.startswith("tok0 ")
    u = final.usage
    assert (u.input_tokens, u.output_tokens) == (prompt_tokens(MESSAGES), 6)
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (10, 20)


def test_anthropic_json(base: str) -> None:
    m = an(base).messages.create(model="fake-claude", max_tokens=64, messages=MESSAGES)
    assert m.usage.output_tokens == 3 and m.usage.input_tokens == prompt_tokens(MESSAGES)


def test_error_status_in_each_api_shape(base: str) -> None:
    with pytest.raises(openai.RateLimitError) as oe:
        oa(base).chat.completions.create(
            model="fake-gpt", messages=MESSAGES, extra_headers={"x-fake-status": "429"}
        )
    assert oe.value.status_code == 429 and oe.value.code == "rate_limit_error"
    with pytest.raises(anthropic.InternalServerError) as ae:
        an(base).messages.create(
            model="fake-claude", max_tokens=8, messages=MESSAGES, extra_body={"x_status": 529}
        )
    assert ae.value.status_code == 529
    assert ae.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "fake upstream error 529"},
    }


def test_abort_after_cuts_the_stream(base: str, stats: httpx.Client) -> None:
    with pytest.raises(openai.APIConnectionError):
        list(
            oa(base).chat.completions.create(
                model="fake-gpt",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"x_chunks": 10, "x_abort_after": 2},
            )
        )
    assert stats.get("/__stats").json()["cut"] == 1


def test_stats_count_requests_connections_and_host(base: str, stats: httpx.Client) -> None:
    client = oa(base, Host="openhands.test")
    client.models.list()
    client.models.list()
    s = stats.get("/__stats").json()
    assert s["requests"] == {"/v1/models": 2} and s["total"] == 2
    assert s["connections"] == 1  # the SDK's keep-alive connection (reset after ours opened)
    assert [r["host"] for r in s["recent"]] == ["openhands.test", "openhands.test"]
    assert s["recent"][0]["authorization"] == "Bearer sk-x"
