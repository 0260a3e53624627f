from __future__ import annotations

import json
import logging

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from addons import errors
from addons.keys import KeyCache
from addons.keys import client_key
from addons.streamtap import StreamTap
from tests.addon_support import chat_sse


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "api, path, style",
    [
        ("openai.chat", "/v1/chat/completions", "openai"),
        ("anthropic.messages", "/v1/messages", "anthropic"),
        (None, "/v1/messages/count_tokens", "anthropic"),
        ("gemini.generate", "/v1beta/models/g:generateContent", "gemini"),
        (None, "/v1/models", "openai"),
    ],
)
def test_style_for(api: str | None, path: str, style: str) -> None:
    assert errors.style_for(api, path) == style


def test_error_shapes() -> None:
    problem = errors.INSUFFICIENT_CREDITS
    openai = errors.error_response("openai", problem, "no money", balance=0.5)
    assert openai.status_code == 402 and openai.headers["content-type"] == "application/json"
    assert json.loads(openai.content or b"") == {
        "error": {
            "message": "no money",
            "type": "insufficient_quota",
            "code": "insufficient_credits",
            "balance": 0.5,
        }
    }
    assert errors.error_body("anthropic", problem, "no money") == {
        "type": "error",
        "error": {"type": "insufficient_credits", "message": "no money"},
    }
    assert errors.error_body("gemini", problem, "no money") == {
        "error": {"code": 402, "message": "no money", "status": "RESOURCE_EXHAUSTED"}
    }


# -- keys ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers, path, style, key",
    [
        ([("authorization", "Bearer sk-1")], "/v1/chat/completions", "openai", "sk-1"),
        ([("authorization", "bearer  sk-1 ")], "/v1/chat/completions", "openai", "sk-1"),
        ([("x-api-key", "sk-2")], "/v1/chat/completions", "openai", None),
        ([("x-api-key", "sk-2")], "/v1/messages", "anthropic", "sk-2"),
        ([("authorization", "Basic abc")], "/v1/messages", "anthropic", None),
        ([("x-goog-api-key", "g-1")], "/v1beta/models/m:generateContent", "gemini", "g-1"),
        ([], "/v1beta/models/m:generateContent?key=g-2", "gemini", "g-2"),
        ([], "/v1/chat/completions?key=g-2", "openai", None),
    ],
)
def test_client_key(headers, path: str, style, key: str | None) -> None:
    request = tutils.treq(
        path=path.encode(), headers=http.Headers([(k.encode(), v.encode()) for k, v in headers])
    )
    assert client_key(request, style) == key


def test_key_cache_expires_and_is_bounded() -> None:
    now = [0.0]
    cache = KeyCache(ttl=10, max_entries=2, clock=lambda: now[0])
    assert cache.get("a") == (False, None)
    cache.put("a", None)  # unknown keys are cached too
    assert cache.get("a") == (True, None)
    now[0] = 10
    assert cache.get("a") == (False, None)
    for key in "bcd":
        cache.put(key, None)
    assert cache.get("b") == (False, None), "the oldest entry made room"
    assert cache.get("d") == (True, None)


def test_key_cache_ttl_zero_caches_nothing() -> None:
    cache = KeyCache(ttl=0)
    cache.put("a", None)
    assert cache.get("a") == (False, None)


# -- stream tap ------------------------------------------------------------------------
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
