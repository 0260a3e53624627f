"""Local error answers (``addons/errors.py``): each Problem in each API's own error shape.

The SDKs' own exception parsing is the judge where an SDK is installed (OpenAI, Anthropic):
a client must get its usual exception, with the status, code and message we meant.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from typing import get_args

import anthropic
import httpx2
import openai
import pytest
from mitmproxy import http

from addons import errors
from addons.errors import Problem
from addons.errors import Style

PROBLEMS = {name: value for name, value in vars(errors).items() if isinstance(value, Problem)}
"""Every Problem the module declares: a new one is checked without editing this file."""
STYLES: tuple[Style, ...] = get_args(Style)

GOOGLE_RPC_CODES = frozenset(
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS "
    "PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE "
    "UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS UNAUTHENTICATED".split()
)
"""``google.rpc.Code`` names: what a Gemini error's ``status`` may say."""

each_problem = pytest.mark.parametrize("problem", PROBLEMS.values(), ids=list(PROBLEMS))


# -- which shape --------------------------------------------------------------------------------
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


@pytest.mark.parametrize(
    "api, path, style",
    [
        ("anthropic.messages", "/somewhere/else", "anthropic"),  # the API decides first
        ("gemini.stream", "/v1/chat/completions", "gemini"),
        ("openai.responses", "/v1/responses", "openai"),
        (None, "/v1alpha/models/g:generateContent", "gemini"),
        (None, "/v1beta/cachedContents", "gemini"),
        (None, "/v1beta", "openai"),  # no "/v1beta/" prefix: not a Gemini path
        (None, "/v1/message", "openai"),
        (None, "/", "openai"),
    ],
)
def test_style_for_falls_back_to_the_path_then_to_openai(
    api: str | None, path: str, style: str
) -> None:
    assert errors.style_for(api, path) == style


# -- what each Problem says -----------------------------------------------------------------------
def test_the_spec_statuses_and_codes() -> None:
    """SPEC, admission 1: unknown/revoked key 401; expired pool 402 ``credits_expired``;
    no balance 402 ``insufficient_credits``."""
    keys = (errors.MISSING_KEY, errors.INVALID_KEY, errors.REVOKED_KEY)
    assert {p.status for p in keys} == {401}
    assert errors.CREDITS_EXPIRED[:2] == (402, "credits_expired")
    assert errors.INSUFFICIENT_CREDITS[:2] == (402, "insufficient_credits")
    assert errors.RATE_LIMITED.status == 429 and errors.UNAVAILABLE.status == 503


def test_each_problem_has_its_own_code() -> None:
    """The code is also the reason recorded on the flow: two problems must not share one."""
    codes = [p.code for p in PROBLEMS.values()]
    assert len(set(codes)) == len(codes), sorted(codes)


@each_problem
def test_each_problem_is_an_error_status_with_a_gemini_code(problem: Problem) -> None:
    assert 400 <= problem.status <= 599
    assert problem.gemini_status in GOOGLE_RPC_CODES
    assert all(problem[1:]), "every API names it"


# -- the documents ---------------------------------------------------------------------------
@each_problem
@pytest.mark.parametrize("style", STYLES)
def test_error_response_is_json_with_the_problems_status(style: Style, problem: Problem) -> None:
    response = errors.error_response(style, problem, "why it failed")
    assert response.status_code == problem.status
    assert response.headers.get_all("content-type") == ["application/json"]
    assert json.loads(response.content or b"") == errors.error_body(style, problem, "why it failed")


@each_problem
def test_error_body_shapes(problem: Problem) -> None:
    message = f"refused: {problem.code}"
    assert errors.error_body("openai", problem, message) == {
        "error": {"message": message, "type": problem.openai_type, "code": problem.code}
    }
    assert errors.error_body("anthropic", problem, message) == {
        "type": "error",
        "error": {"type": problem.anthropic_type, "message": message},
    }
    assert errors.error_body("gemini", problem, message) == {
        "error": {"code": problem.status, "message": message, "status": problem.gemini_status}
    }


def test_error_shapes() -> None:
    problem = errors.INSUFFICIENT_CREDITS
    openai_response = errors.error_response("openai", problem, "no money", balance=0.5)
    assert openai_response.status_code == 402
    assert openai_response.headers["content-type"] == "application/json"
    assert json.loads(openai_response.content or b"") == {
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


@pytest.mark.parametrize("style", ["anthropic", "gemini"])
def test_extra_fields_join_openais_error_only(style: Style) -> None:
    problem = errors.INSUFFICIENT_CREDITS
    plain = errors.error_body(style, problem, "no money")
    assert errors.error_body(style, problem, "no money", balance=0.5) == plain


@pytest.mark.parametrize("message", ['quote " and \\ backslash', "ünïcödé ✓", "line\nbreak"])
def test_the_message_survives_json(message: str) -> None:
    for style in STYLES:
        response = errors.error_response(style, errors.BAD_REQUEST, message)
        assert json.loads(response.content or b"")["error"]["message"] == message


# -- the SDKs read them as their own -----------------------------------------------------------
def sdk_transport(response: http.Response) -> httpx2.MockTransport:
    """Every request the SDK makes gets ``response``, as the proxy would send it."""
    headers = [(k, v) for k, v in response.headers.items(multi=True)]
    content = response.content or b""
    return httpx2.MockTransport(
        lambda request: httpx2.Response(response.status_code, headers=headers, content=content)
    )


def openai_call(transport: httpx2.MockTransport) -> Callable[[], Any]:
    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://proxy.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )
    return lambda: client.chat.completions.create(model="gpt-4o", messages=[])


def anthropic_call(transport: httpx2.MockTransport) -> Callable[[], Any]:
    client = anthropic.Anthropic(
        api_key="sk-test",
        base_url="http://proxy.test",
        max_retries=0,
        http_client=httpx2.Client(transport=transport),
    )
    return lambda: client.messages.create(model="claude-sonnet-4-5", max_tokens=1, messages=[])


@each_problem
def test_the_openai_sdk_raises_its_status_error_with_our_code(problem: Problem) -> None:
    message = f"refused: {problem.code}"
    call = openai_call(sdk_transport(errors.error_response("openai", problem, message)))
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    assert raised.value.status_code == problem.status
    assert (raised.value.code, raised.value.type) == (problem.code, problem.openai_type)
    assert str(raised.value) == f"Error code: {problem.status} - {message}"


@each_problem
def test_the_anthropic_sdk_raises_its_status_error_with_our_type(problem: Problem) -> None:
    message = f"refused: {problem.code}"
    call = anthropic_call(sdk_transport(errors.error_response("anthropic", problem, message)))
    with pytest.raises(anthropic.APIStatusError) as raised:
        call()
    assert raised.value.status_code == problem.status
    assert (raised.value.type, raised.value.api_message) == (problem.anthropic_type, message)


def test_an_unknown_key_is_each_sdks_authentication_error() -> None:
    """What a client catches for a bad key (SPEC: 401 in the API's own shape)."""
    problem = errors.INVALID_KEY
    with pytest.raises(openai.AuthenticationError):
        openai_call(sdk_transport(errors.error_response("openai", problem, "bad key")))()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_call(sdk_transport(errors.error_response("anthropic", problem, "bad key")))()
