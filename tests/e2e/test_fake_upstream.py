"""The fake upstream, hit directly with the official SDKs (fast: no proxy)."""

from __future__ import annotations

import json
import socket
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


# -- --realistic, /__received and the hostile knobs (what the attack suite relies on) ------
@pytest.fixture(scope="module")
def realistic() -> Iterator[str]:
    with serve_in_thread(realistic=True) as port:
        yield f"http://127.0.0.1:{port}"


def received(base: str) -> list[dict[str, Any]]:
    return list(httpx.get(base + "/__received", timeout=5).json()["received"])


def raw_post(base: str, target: str, body: object, **headers: str) -> tuple[int, bytes]:
    """One request with ``target`` sent exactly as given (httpx would normalise it)."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    head = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Connection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + data)
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def test_received_records_the_request_as_it_arrived(base: str) -> None:
    oa(base).chat.completions.create(model="fake-gpt", messages=MESSAGES)
    (record,) = [r for r in received(base) if r["target"] == "/v1/chat/completions"][-1:]
    assert record["method"] == "POST" and record["served"] == "openai.chat"
    assert ["authorization", "Bearer sk-x"] in record["headers"]  # as the SDK spelt it
    assert json.loads(record["body"])["model"] == "fake-gpt"
    assert record["generated"] == {"input": prompt_tokens(MESSAGES), "output": 3}


def test_realistic_resolves_the_target_before_routing(realistic: str) -> None:
    body = {"model": "fake-gpt", "messages": MESSAGES}
    for target in (
        "/v1/chat/completions#/v1/messages/count_tokens",
        "/v1/messages/count_tokens/../../chat/%63ompletions",
        "//v1/./chat//completions/",
    ):
        status, _ = raw_post(realistic, target, body)
        assert status == 200, target
        assert received(realistic)[-1]["served"] == "openai.chat"
    status, _ = raw_post(realistic, "/v1/nothing/here", body)
    assert status == 404 and received(realistic)[-1]["served"] is None


def test_realistic_names_every_model_and_caps_the_output(realistic: str) -> None:
    raw = '{"model": "fake-embed", "model": " Fake-GPT ", "max_tokens": 4, "messages": []}'
    r = httpx.post(realistic + "/v1/chat/completions", content=raw, timeout=5)
    assert r.status_code == 200
    record = received(realistic)[-1]
    assert record["models"] == ["fake-embed", "fake-gpt"]
    _, answer = raw_post(
        realistic,
        "/v1/chat/completions",
        {"model": "fake-gpt", "messages": [], "max_tokens": 4, "x_chunks": 3, "x_thoughts": 10},
    )
    usage = json.loads(answer)["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 4
    assert received(realistic)[-1]["generated"]["output"] == 4


def test_realistic_gemini_field_mask_leaves_the_usage_out(realistic: str) -> None:
    body = {"contents": [{"parts": [{"text": "hi"}]}], "x_thoughts": 7}
    path = "/v1beta/models/Fake-Pro:generateContent"
    _, whole = raw_post(realistic, path, body)
    assert json.loads(whole)["usageMetadata"]["thoughtsTokenCount"] == 7
    assert received(realistic)[-1]["models"] == ["fake-pro"]
    _, masked = raw_post(realistic, path + "?fields=candidates", body)
    assert list(json.loads(masked)) == ["candidates"]
    _, header_masked = raw_post(realistic, path, body, **{"X-Goog-FieldMask": "modelVersion"})
    assert list(json.loads(header_masked)) == ["modelVersion"]
    _, proto = raw_post(realistic, path + "?alt=proto", body)
    with pytest.raises(ValueError):
        json.loads(proto)
    assert received(realistic)[-1]["generated"] == {
        "input": prompt_tokens(body["contents"]),
        "output": 10,
    }
    _, sse = raw_post(realistic, path.replace(":generate", ":streamGenerate") + "?alt=sse", body)
    assert b'"thoughtsTokenCount": 7' in sse and sse.count(b"data: ") >= 3


def test_wire_answers_with_the_bytes_given(realistic: str) -> None:
    wire = "HTTP/1.1 418 Teapot\r\nContent-Length: 2\r\n\r\nhi"
    status, answer = raw_post(
        realistic,
        "/v1/chat/completions",
        {
            "model": "fake-gpt",
            "messages": [],
            "x_wire": wire,
            "x_wire_generated": {"input": 1, "output": 2},
        },
    )
    assert (status, answer) == (418, b"hi")
    assert received(realistic)[-1]["generated"] == {"input": 1, "output": 2}
    raw_post(
        realistic, "/v1/chat/completions", {"model": "fake-gpt", "messages": [], "x_status": 500}
    )
    assert (
        received(realistic)[-1]["generated"] is None
    )  # a dishonest answer generated nothing known
