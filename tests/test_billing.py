"""addons/billing.py: usage and settlements of admitted requests, from records built directly."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
from mitmproxy import flow
from mitmproxy import http
from mitmproxy.connection import ConnectionState

from addons import billing
from addons.streamtap import StreamTap
from burnmeter import pricing
from burnmeter.estimate import estimate_input_tokens
from burnmeter.estimate import estimate_output_tokens
from burnmeter.estimate import held_usage as estimated_held_usage
from burnmeter.records import UsageRecord
from tests.addon_support import chat_sse
from tests.addon_support import json_response
from tests.addon_support import make_flow
from tests.addon_support import sse_response
from tests.phase_support import admitted

CHAT_USAGE = {"prompt_tokens": 1000, "completion_tokens": 200, "total_tokens": 1200}
REPORTED = UsageRecord(input_tokens=1000, output_tokens=200)
MESSAGES = [{"role": "user", "content": "tell me a long story " * 40}]


def stream_flow() -> http.HTTPFlow:
    return make_flow(body={"model": "gpt-4o", "messages": MESSAGES, "stream": True})


def tapped(body: bytes) -> StreamTap:
    tap = StreamTap("openai.chat")
    tap(body)
    return tap


def careful_input(f: http.HTTPFlow) -> int:
    """The input estimate of the body as forwarded, under the test config."""
    return estimate_input_tokens("openai.chat", json.loads(f.request.content or b""))


# -- usage of a response that arrived whole ------------------------------------------------
def test_reported_usage_of_a_json_answer_is_charged() -> None:
    f = make_flow()
    phase = admitted(f)
    response = json_response({"model": "gpt-4o", "choices": [], "usage": CHAT_USAGE})
    usage = billing.response_usage(phase, f.request, response)
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (1000, 200)
    assert usage.source == "reported"


def test_a_whole_answer_without_the_usage_its_api_always_reports_is_charged_its_hold() -> None:
    f = make_flow()
    phase = admitted(f, output_tokens_paid=50)
    usage = billing.response_usage(phase, f.request, json_response({"choices": []}))
    held = estimated_held_usage(phase.estimate, phase.quote)
    assert usage is not None and usage.input_tokens == held.input_tokens
    assert usage.output_tokens == 50 < held.output_tokens, "the output limit it was sent with"
    assert usage == billing.held_usage(phase)


def test_an_error_answer_without_usage_charges_nothing() -> None:
    f = make_flow()
    error = json_response({"error": {"message": "boom"}}, status=500)
    assert billing.response_usage(admitted(f), f.request, error) is None


def test_a_stream_that_reported_its_usage_is_charged_that() -> None:
    f = stream_flow()
    phase = admitted(f, tap=tapped(chat_sse(["Hel", "lo"], CHAT_USAGE)))
    usage = billing.response_usage(phase, f.request, sse_response())
    assert usage is not None and usage.source == "reported" and usage.output_tokens == 200


def test_a_stream_cut_short_is_estimated_from_the_forwarded_body_and_the_text() -> None:
    f = stream_flow()
    text = ["x" * 37, "y" * 50]
    phase = admitted(f, tap=tapped(chat_sse(text, None)))
    as_sent = careful_input(f)
    f.request.content = json.dumps(
        {"model": "gpt-4o", "messages": MESSAGES * 2, "stream": True}
    ).encode()  # as forwarded: what the upstream read
    usage = billing.response_usage(phase, f.request, sse_response())
    assert usage is not None and usage.source == "estimated"
    assert usage.input_tokens == careful_input(f) > as_sent
    assert usage.output_tokens == estimate_output_tokens(sum(map(len, text)))


def test_the_input_estimate_does_not_depend_on_the_config() -> None:
    f = stream_flow()
    assert billing.input_estimate(admitted(f), f.request) == careful_input(f) > 0


def test_reported_usage_below_the_text_seen_is_raised_to_it() -> None:
    f = make_flow()
    phase = admitted(f)
    seen = billing.estimated(phase, f.request, REPORTED, text_chars=10_000)
    assert seen.input_tokens == 1000 and seen.output_tokens == estimate_output_tokens(10_000)
    assert seen.source == "estimated"
    assert billing.estimated(phase, f.request, REPORTED, text_chars=10) is REPORTED


def test_an_interim_answer_is_charged_its_hold() -> None:
    f = make_flow()
    phase = admitted(f)
    interim = http.Response.make(103, b"", {})
    assert billing.interim(interim) and not billing.interim(json_response({}))
    assert billing.response_usage(phase, f.request, interim) == billing.held_usage(phase)
    assert billing.error_usage(phase, f.request, interim) == billing.held_usage(phase)


def test_arrived_whole() -> None:
    f = stream_flow()
    open_stream = admitted(f, tap=tapped(chat_sse(["a"], None)))
    assert not billing.arrived_whole(open_stream, sse_response())
    ended = admitted(f, tap=tapped(chat_sse(["a"], CHAT_USAGE)))
    assert billing.arrived_whole(ended, sse_response())
    assert billing.arrived_whole(admitted(make_flow()), json_response({}))


# -- usage of a request that failed --------------------------------------------------------
def test_nothing_reached_the_client_nothing_is_charged() -> None:
    f = make_flow()
    assert billing.error_usage(admitted(f), f.request, None) is None


def test_an_upstream_error_is_charged_only_what_it_reported() -> None:
    f = stream_flow()
    phase = admitted(f, tap=tapped(chat_sse(["a"], CHAT_USAGE)))
    error = sse_response(status=500)
    assert billing.error_usage(phase, f.request, error) == billing.response_usage(
        phase, f.request, error
    )


def test_a_client_that_left_is_charged_its_hold_or_what_it_saw_if_dearer() -> None:
    f = stream_flow()
    few = admitted(f, tap=tapped(chat_sse(["a"], None)))
    assert billing.error_usage(few, f.request, None, client_left=True) == billing.held_usage(few)
    tap = tapped(chat_sse(["z" * 60_000], None))
    many = admitted(f, tap=tap, output_tokens_paid=10)
    seen = billing.estimated(many, f.request, None, tap.usage.text_chars)
    assert seen.output_tokens == estimate_output_tokens(60_000)
    charged = billing.error_usage(many, f.request, None, client_left=True)
    assert charged == seen
    cost = pricing.cost(charged, many.quote)
    assert cost > pricing.cost(billing.held_usage(many), many.quote)


def test_error_status_and_client_left() -> None:
    f = make_flow()
    f.error = flow.Error("Server disconnected.")
    assert billing.error_status(f) == billing.UPSTREAM_FAILED
    f.error = flow.Error("Client disconnected.")
    assert billing.error_status(f) == billing.CLIENT_CLOSED
    assert not billing.client_left(f, billing.CLIENT_CLOSED), "never reached the upstream"
    f.server_conn.timestamp_tcp_setup = time.time()
    assert billing.client_left(f, billing.CLIENT_CLOSED)
    assert not billing.client_left(f, billing.UPSTREAM_FAILED)
    f.error = flow.Error("connection lost")
    f.client_conn.state = ConnectionState.CAN_WRITE  # HTTP/2: the client closed its side
    assert billing.error_status(f) == billing.CLIENT_CLOSED
    f.response = json_response({}, status=429)
    assert billing.error_status(f) == 429
    f.response = http.Response.make(100, b"", {})
    assert billing.error_status(f) == billing.UPSTREAM_FAILED


# -- the settlement ----------------------------------------------------------------------
@pytest.mark.parametrize("usage", [REPORTED, None])
def test_the_settlement_prices_the_usage_for_the_pool_that_pays(usage: UsageRecord | None) -> None:
    f = make_flow(body={"model": "special", "messages": []})
    phase = admitted(f)
    settlement = billing.settlement(f, phase, usage, 200)
    expected = pricing.cost(usage, phase.quote) if usage else Decimal(0)
    assert settlement.cost == expected and (expected > 0) == (usage is not None)
    assert settlement.pool == phase.pool == "ohmygpt", "the model's own pool"
    assert settlement.user_id == "alice" and settlement.key_doc_id == phase.owner.key_doc_id
    assert settlement.input_tokens == (usage.input_tokens if usage else 0)
    log = settlement.log
    assert log["_id"] == f.id and log["creditsCost"] == expected and log["creditType"] == "ohmygpt"
    assert log["userKeyId"] == phase.key_mask and log["model"] == phase.quote.model
    assert log["ttftMs"] is None and log["statusCode"] == 200 and log["stream"] is False


def test_the_settlement_of_a_stream_has_its_time_to_first_byte() -> None:
    f = stream_flow()
    f.request.timestamp_start = time.time() - 1
    tap = tapped(chat_sse(["a"], CHAT_USAGE))
    settlement = billing.settlement(f, admitted(f, tap=tap), REPORTED, 200)
    assert tap.first_byte_at is not None
    expected = round((tap.first_byte_at - f.request.timestamp_start) * 1000)
    assert settlement.log["ttftMs"] == expected >= 1000 and settlement.log["stream"] is True
