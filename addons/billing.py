"""What a finished (or failed) request costs: usage, or an estimate, priced into a Settlement.

Usage the upstream reported wins. When it is missing or a stream was cut short, the charge
is an estimate flagged ``usageSource: "estimated"``: the request's input estimate (made
only then, from the body as forwarded) plus output from the characters generated, never
less than what was reported. An answer that
arrived whole and successful without the usage its API always reports (an upstream talked
into leaving it out) is charged what was held for it: the estimated input and the whole
output limit, not the visible text. So is an answer the proxy cannot read past: an interim
1xx (``100``/``102``/``103``) or a ``101`` nobody asked for, after which mitmproxy reads no
final answer (its HTTP/1 client takes the 1xx for the whole response), while the upstream
may well have generated.

Each function takes the phase it needs (``addons/phases.py``): the usage of an answer needs
an ``Admitted`` request, a settlement a ``Quoted`` one at least.
"""

from __future__ import annotations

import dataclasses
import json
import time

from mitmproxy import http
from mitmproxy.connection import ConnectionState

from addons.phases import Admitted
from addons.phases import Quoted
from burnmeter import pricing
from burnmeter.documents import request_log
from burnmeter.documents import utcnow
from burnmeter.estimate import EMBEDDING_APIS
from burnmeter.estimate import estimate_input_tokens
from burnmeter.estimate import estimate_output_tokens
from burnmeter.estimate import held_usage as estimated_held_usage
from burnmeter.money import ZERO
from burnmeter.records import UsageRecord
from burnmeter.store.base import Settlement
from burnmeter.usage import usage_from_json

CLIENT_CLOSED = 499
"""Status logged when the client went away mid-response (nginx's convention)."""
UPSTREAM_FAILED = 502
ALWAYS_REPORTED = frozenset(
    {
        "openai.chat",
        "openai.responses",
        "openai.embeddings",
        "anthropic.messages",
        "gemini.generate",
    }
)
"""APIs whose complete answers always carry usage (Gemini's embeddings do not)."""


def input_estimate(admitted: Admitted, request: http.Request) -> int:
    """The careful estimate of the request's input tokens, from its body as forwarded
    (decoded again): only a settlement without reported usage needs it."""
    body = json.loads(request.content or b"")
    return estimate_input_tokens(admitted.api, body)


def estimated(
    admitted: Admitted, request: http.Request, reported: UsageRecord | None, text_chars: int
) -> UsageRecord:
    """Usage of a request the upstream did not (fully) report."""
    output = estimate_output_tokens(text_chars)
    if reported is None:
        input_tokens = input_estimate(admitted, request)
        return UsageRecord(input_tokens=input_tokens, output_tokens=output, source="estimated")
    if reported.output_tokens >= output:
        return reported
    return dataclasses.replace(reported, output_tokens=output, source="estimated")


def held_usage(phase: Quoted) -> UsageRecord:
    """What the request's hold pays for: the input's upper bound plus the output limit it
    was forwarded with (a request not admitted yet: its own limit)."""
    usage = estimated_held_usage(phase.estimate, phase.quote)
    if not isinstance(phase, Admitted) or phase.output_tokens_paid is None:
        return usage
    forwarded = phase.output_tokens_paid * phase.estimate.choices
    return dataclasses.replace(usage, output_tokens=min(usage.output_tokens, forwarded))


def interim(response: http.Response | None) -> bool:
    """An informational answer (1xx) in place of the final one; the client never waits for
    one (mitmproxy answers ``Expect: 100-continue`` itself, upgrades are refused)."""
    return response is not None and 100 <= response.status_code < 200


def response_usage(
    admitted: Admitted, request: http.Request, response: http.Response
) -> UsageRecord | None:
    """Usage of a response that arrived whole (``response`` hook); ``request``: as
    forwarded."""
    if interim(response):
        return held_usage(admitted)
    success = 200 <= response.status_code < 300
    if admitted.tap is not None:
        stream = admitted.tap.usage
        reported, _ = stream.result()
        if not success or (stream.done and reported is not None):
            return reported
        if stream.done and admitted.api in ALWAYS_REPORTED:
            return held_usage(admitted)
        return estimated(admitted, request, reported, stream.text_chars)
    content = None if response.stream else response.get_content(strict=False)
    reported = None
    if content and "json" in response.headers.get("content-type", ""):
        reported, _ = usage_from_json(admitted.api, content)
    if reported is not None or not success:
        return reported
    if admitted.api in ALWAYS_REPORTED:
        return held_usage(admitted)
    generated = 0 if admitted.api in EMBEDDING_APIS else len(content or b"")
    return estimated(admitted, request, None, generated)


def arrived_whole(admitted: Admitted, response: http.Response) -> bool:
    """The whole response is in, whether or not its ``response`` hook has run."""
    if admitted.tap is not None:
        return admitted.tap.usage.done
    return response.raw_content is not None


def error_usage(
    admitted: Admitted,
    request: http.Request,
    response: http.Response | None,
    *,
    client_left: bool = False,
) -> UsageRecord | None:
    """Usage of a request that failed (``error`` hook): only what was reported for an
    upstream error answer (as ``response_usage``), else an estimate of what reached the
    client, None if nothing did.

    ``client_left``: the client closed its connection after the request went upstream and
    before the answer's usage. mitmproxy then closes the upstream connection too, so what
    the upstream generated (and bills, hidden reasoning included) can never be read: the
    request is charged its hold, or the estimate where that is dearer."""
    if interim(response):
        return held_usage(admitted)
    tap = admitted.tap
    if response is not None and not 200 <= response.status_code < 300:
        return tap.usage.result()[0] if tap is not None else None
    if response is None and not client_left:
        return None
    reported = tap.usage.result()[0] if tap is not None else None
    text_chars = tap.usage.text_chars if tap is not None else 0
    seen = estimated(admitted, request, reported, text_chars)
    if not client_left:
        return seen
    quote = admitted.quote
    return max(held_usage(admitted), seen, key=lambda usage: pricing.cost(usage, quote))


def client_left(flow: http.HTTPFlow, status: int) -> bool:
    """The client went away after its request reached the upstream (which may generate)."""
    return status == CLIENT_CLOSED and flow.server_conn.timestamp_tcp_setup is not None


def error_status(flow: http.HTTPFlow) -> int:
    """The upstream's own error status if it answered one, else who cut the request off."""
    assert flow.error is not None
    response = flow.response
    if interim(response):
        return UPSTREAM_FAILED
    if response is not None and not 200 <= response.status_code < 300:
        return response.status_code
    client_closed = not flow.client_conn.state & ConnectionState.CAN_READ  # e.g. HTTP/2's
    if client_closed or "client" in flow.error.msg.lower():  # "peer closed connection"
        return CLIENT_CLOSED
    return UPSTREAM_FAILED


def settlement(
    flow: http.HTTPFlow, phase: Quoted, usage: UsageRecord | None, status: int
) -> Settlement:
    """The charge (0 without usage, releasing the hold) and its request log document;
    ``phase``: ``Admitted``, or ``Quoted`` for a request whose hold was never answered."""
    quote = phase.quote
    cost = pricing.cost(usage, quote) if usage else ZERO
    billing_tokens = pricing.billing_tokens(usage, quote) if usage else 0
    started = flow.request.timestamp_start
    tap = phase.tap if isinstance(phase, Admitted) else None
    first_byte = tap.first_byte_at if tap else None
    log = request_log(
        request_id=flow.id,
        user_id=phase.user_id,
        key_mask=phase.key_mask,
        model=quote.model,
        usage=usage,
        cost=cost,
        billing_tokens=billing_tokens,
        pool=phase.pool,
        status_code=status,
        latency_ms=round((time.time() - started) * 1000),
        ttft_ms=round((first_byte - started) * 1000) if first_byte else None,
        host=phase.host,
        upstream=phase.upstream,
        path=phase.path,
        stream=phase.stream,
        created_at=utcnow(),
        route_multiplier=quote.route_multiplier,
    )
    return Settlement(
        request_id=flow.id,
        user_id=phase.user_id,
        pool=phase.pool,
        cost=cost,
        billing_tokens=billing_tokens,
        input_tokens=usage.input_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        key_doc_id=phase.owner.key_doc_id,
        log=log,
    )
