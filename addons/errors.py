"""Local error answers in the shape of the API the client called.

OpenAI paths get ``{"error": {"message", "type", "code"}}``, ``/v1/messages`` gets
Anthropic's ``{"type": "error", "error": {"type", "message"}}`` and Gemini paths get
``{"error": {"code", "message", "status"}}``, so that each SDK raises its usual exception.
"""

from __future__ import annotations

import json
from typing import Any
from typing import Literal
from typing import NamedTuple

from mitmproxy import http

Style = Literal["openai", "anthropic", "gemini"]


class Problem(NamedTuple):
    """Why a request is answered locally, and how each API spells it."""

    status: int
    code: str
    """OpenAI's ``code``; also the ``reason`` recorded on the flow."""
    openai_type: str
    anthropic_type: str
    gemini_status: str


MISSING_KEY = Problem(
    401, "missing_api_key", "invalid_request_error", "authentication_error", "UNAUTHENTICATED"
)
INVALID_KEY = Problem(
    401, "invalid_api_key", "authentication_error", "authentication_error", "UNAUTHENTICATED"
)
REVOKED_KEY = Problem(
    401, "revoked_api_key", "authentication_error", "authentication_error", "UNAUTHENTICATED"
)
CREDITS_EXPIRED = Problem(
    402, "credits_expired", "insufficient_quota", "credits_expired", "FAILED_PRECONDITION"
)
INSUFFICIENT_CREDITS = Problem(
    402, "insufficient_credits", "insufficient_quota", "insufficient_credits", "RESOURCE_EXHAUSTED"
)
BAD_REQUEST = Problem(
    400, "invalid_request", "invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"
)
AMBIGUOUS = Problem(
    400, "ambiguous_request", "invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"
)
"""A request that two readers could read differently (path, host, keys, framing, JSON)."""
USAGE_MASKED = Problem(
    400,
    "unsupported_parameter",
    "invalid_request_error",
    "invalid_request_error",
    "INVALID_ARGUMENT",
)
"""A parameter that makes the upstream leave the usage out of its answer."""
UNKNOWN_HOST = Problem(
    421, "unknown_host", "invalid_request_error", "invalid_request_error", "FAILED_PRECONDITION"
)
"""A host no route names, and no default route."""
UNKNOWN_MODEL = Problem(
    400, "model_not_found", "invalid_request_error", "invalid_request_error", "INVALID_ARGUMENT"
)
TOO_LARGE = Problem(
    413, "request_too_large", "invalid_request_error", "request_too_large", "INVALID_ARGUMENT"
)
COMPRESSED_BODY = Problem(
    415,
    "unsupported_content_encoding",
    "invalid_request_error",
    "invalid_request_error",
    "INVALID_ARGUMENT",
)
UNSUPPORTED = Problem(
    404, "unsupported_endpoint", "invalid_request_error", "not_found_error", "NOT_FOUND"
)
UPSTREAM_UNREADABLE = Problem(502, "upstream_error", "server_error", "api_error", "INTERNAL")
"""The upstream answered something the proxy cannot pass on (an interim 1xx, a 101)."""
UNAVAILABLE = Problem(503, "metering_unavailable", "server_error", "api_error", "UNAVAILABLE")
RATE_LIMITED = Problem(
    429, "rate_limit_exceeded", "requests", "rate_limit_error", "RESOURCE_EXHAUSTED"
)


def style_for(api: str | None, path: str) -> Style:
    """The error shape for a request: by metered API, else by path."""
    family = api.partition(".")[0] if api else None
    if family == "anthropic" or path.startswith("/v1/messages"):
        return "anthropic"
    if family == "gemini" or path.startswith(("/v1beta/", "/v1alpha/")):
        return "gemini"
    return "openai"


def error_body(style: Style, problem: Problem, message: str, **extra: Any) -> dict[str, Any]:
    """The JSON error document; ``extra`` fields join OpenAI's ``error`` object."""
    match style:
        case "anthropic":
            return {"type": "error", "error": {"type": problem.anthropic_type, "message": message}}
        case "gemini":
            return {
                "error": {
                    "code": problem.status,
                    "message": message,
                    "status": problem.gemini_status,
                }
            }
    error = {"message": message, "type": problem.openai_type, "code": problem.code, **extra}
    return {"error": error}


def error_response(style: Style, problem: Problem, message: str, **extra: Any) -> http.Response:
    return http.Response.make(
        problem.status,
        json.dumps(error_body(style, problem, message, **extra)),
        {"Content-Type": "application/json"},
    )
