from __future__ import annotations

import json

import pytest
from mitmproxy import http
from mitmproxy.test import tutils

from addons import errors
from addons.keys import KeyCache
from addons.keys import client_key


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
