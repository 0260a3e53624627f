"""addons/inspection.py: flow records, comments and marks, commands' text, the contentview."""

from __future__ import annotations

import json
from decimal import Decimal

from mitmproxy import contentviews
from mitmproxy.test import tflow
from mitmproxy.test import tutils

from addons import billing
from addons.inspection import LLMStreamContentview
from addons.inspection import annotate
from addons.inspection import comment
from addons.inspection import describe
from addons.inspection import describe_settled
from addons.inspection import format_balances
from addons.inspection import usage_summary
from addons.inspection import usd
from addons.phases import Settled
from addons.streamtap import StreamTap
from burnmeter.records import UsageRecord
from burnmeter.sse import MAX_EVENT_BYTES
from tests.addon_support import KEY
from tests.addon_support import OPENHANDS_HOST
from tests.addon_support import chat_sse
from tests.addon_support import make_flow
from tests.phase_support import admitted
from tests.phase_support import authenticated
from tests.phase_support import quoted

USAGE = UsageRecord(input_tokens=1000, output_tokens=200, cache_read_tokens=30)


def settled(phase, usage: UsageRecord | None, status: int = 200, reason=None) -> Settled:
    f = make_flow()
    settlement = billing.settlement(f, phase, usage, status)
    return Settled(phase=phase, usage=usage, settlement=settlement, status=status, reason=reason)


# -- describe: what is known of the request, phase by phase ------------------------------
def test_a_request_refused_before_authentication_is_described_by_its_outcome_alone() -> None:
    record = describe(None, "rejected", status=401, reason="invalid_api_key")
    assert record == {"outcome": "rejected", "status": 401, "reason": "invalid_api_key"}


def test_an_authenticated_request_is_described_by_who_calls_and_where() -> None:
    phase = authenticated(make_flow())
    record = describe(phase, "rejected", status=413, reason="request_too_large")
    assert record["user"] == "alice" and record["key"] == phase.key_mask != KEY
    assert record["pool"] == "openhands" and record["api"] == "openai.chat"
    assert record["model"] is None and record["stream"] is False, "no body read yet"
    assert record["host"] == OPENHANDS_HOST and record["upstream"] == phase.upstream
    assert KEY not in json.dumps(record)


def test_a_quoted_request_is_described_with_its_model_and_the_pool_that_pays() -> None:
    f = make_flow(body={"model": "special", "messages": [], "stream": True})
    record = describe(quoted(f), "rejected", status=402, reason="insufficient_credits")
    assert record["model"] == "special" and record["pool"] == "ohmygpt"
    assert record["stream"] is True


def test_a_settled_request_is_described_with_its_usage_and_charge() -> None:
    phase = admitted(make_flow())
    done = settled(phase, USAGE)
    record = describe_settled(done)
    assert record["outcome"] == "charged" and record["status"] == 200
    assert (record["input_tokens"], record["output_tokens"]) == (1000, 200)
    assert record["cache_read_tokens"] == 30 and record["total_tokens"] == USAGE.total_tokens
    assert record["cost"] == str(done.settlement.cost) and Decimal(record["cost"]) > 0
    assert record["billing_tokens"] == done.settlement.billing_tokens
    assert record["usage_source"] == "reported" and "holdless" not in record


def test_a_request_settled_without_usage_failed() -> None:
    record = describe_settled(settled(admitted(make_flow()), None, 502, "upstream answered 502"))
    assert record["outcome"] == "failed" and record["reason"] == "upstream answered 502"
    assert record["cost"] == "0" and record["usage_source"] == "none"
    assert record["input_tokens"] == record["total_tokens"] == 0


def test_a_holdless_admission_is_flagged() -> None:
    record = describe_settled(settled(admitted(make_flow(), held=None), USAGE))
    assert record["holdless"] is True
    never_held = describe_settled(settled(quoted(make_flow()), None, 503, "proxy shut down"))
    assert "holdless" not in never_held, "its hold was under way, not skipped"


def test_events_passed_on_unread_are_counted() -> None:
    f = make_flow(body={"model": "gpt-4o", "messages": [], "stream": True})
    tap = StreamTap("openai.chat")
    tap(b"data: " + b"x" * (MAX_EVENT_BYTES + 1) + b"\n\n")
    record = describe(admitted(f, tap=tap), "charged")
    assert tap.usage.overflows == 1 and record["oversized_events"] == 1
    assert "oversized_events" not in describe(admitted(f, tap=StreamTap("openai.chat")), "charged")


# -- comments, marks, commands -----------------------------------------------------------
def test_annotate_comments_and_marks_what_needs_a_look() -> None:
    f = tflow.tflow()
    done = settled(admitted(make_flow()), USAGE)
    annotate(f, describe_settled(done))
    cost = usd(done.settlement.cost)
    assert f.comment == f"alice · gpt-4o · {USAGE.total_tokens:,} tok · {cost} · openhands"
    assert not f.marked and f.metadata["metering"]["outcome"] == "charged"
    estimated = UsageRecord(input_tokens=10, output_tokens=2, source="estimated")
    annotate(f, describe_settled(settled(admitted(make_flow()), estimated)))
    assert f.marked == ":warning:" and f.comment.endswith(" · estimated")
    annotate(f, describe(None, "rejected", status=401, reason="missing_api_key"))
    assert f.marked == ":no_entry:" and f.comment == "anonymous · rejected: missing_api_key"
    failed = describe_settled(settled(admitted(make_flow()), None, 502, "upstream answered 502"))
    annotate(f, failed)
    assert f.marked == ":x:" and f.comment.endswith("failed: upstream answered 502")


def test_usd_keeps_small_costs_apart() -> None:
    assert usd(Decimal(0)) == "$0"
    assert usd(Decimal("0.0123")) == "$0.0123"
    assert usd(Decimal("0.000213")) == "$0.000213"
    assert usd(Decimal("0.000000004")) == "$0.000000004"
    assert usd(Decimal("1234.5")) == "$1,234.5000"


def test_usage_summary_adds_up_the_charged_flows() -> None:
    flows = []
    usages = [USAGE, UsageRecord(input_tokens=5, output_tokens=7, cache_write_tokens=11)]
    records = [describe_settled(settled(admitted(make_flow()), u)) for u in usages]
    for record in records:
        f = tflow.tflow()
        annotate(f, record)
        flows.append(f)
    rejected = tflow.tflow()
    annotate(rejected, describe(None, "rejected", status=401, reason="missing_api_key"))
    total_in = sum(u.input_tokens + u.cache_read_tokens + u.cache_write_tokens for u in usages)
    total_out = sum(u.output_tokens for u in usages)
    cost = sum((Decimal(r["cost"]) for r in records), Decimal(0))
    expected = f"2 flows · {total_in:,}/{total_out:,} tokens · {usd(cost)}"
    assert usage_summary([*flows, rejected, tflow.tflow()]) == expected


def test_format_balances() -> None:
    balances = [("openhands", Decimal(5)), ("ohmygpt", Decimal("0.00021"))]
    assert format_balances(balances) == f"openhands: {usd(Decimal(5))} · ohmygpt: $0.000210"
    assert comment({"outcome": "passthrough", "pool": "openhands"}) == "anonymous · openhands"


# -- the contentview ----------------------------------------------------------------
def test_contentview_reassembles_text_and_usage() -> None:
    body = chat_sse(["Hello", ", world"], {"prompt_tokens": 9, "completion_tokens": 2})
    f = tflow.tflow(req=tutils.treq(path=b"/v1/chat/completions"))
    view = LLMStreamContentview()
    meta = contentviews.Metadata(flow=f, content_type="text/event-stream")
    assert view.render_priority(body, meta) > 1
    out = view.prettify(body, meta)
    assert out.startswith("Hello, world\n")
    assert "4 events · model gpt-4o · done=True" in out
    assert "usage: input 9 · output 2" in out
    assert view.name == "LLM Stream"


def test_contentview_anthropic_and_gemini_array() -> None:
    view = LLMStreamContentview()
    events = [
        {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 1}},
    ]
    body = b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events)
    f = tflow.tflow(req=tutils.treq(path=b"/v1/messages"))
    assert view.prettify(body, contentviews.Metadata(flow=f)).startswith("Hi\n")
    gemini = [{"candidates": [{"content": {"parts": [{"text": "Yo"}]}, "finishReason": "STOP"}]}]
    g = tflow.tflow(req=tutils.treq(path=b"/v1beta/models/m:streamGenerateContent"))
    out = view.prettify(json.dumps(gemini).encode(), contentviews.Metadata(flow=g))
    assert out.startswith("Yo\n") and "usage: none reported" in out


def test_contentview_declines_other_bodies() -> None:
    view = LLMStreamContentview()
    f = tflow.tflow(req=tutils.treq(path=b"/index.html"))
    meta = contentviews.Metadata(flow=f, content_type="text/event-stream")
    assert view.render_priority(b"data: 1\n\n", meta) < 0
    json_meta = contentviews.Metadata(flow=tflow.tflow(), content_type="application/json")
    assert view.render_priority(b"{}", json_meta) < 0
