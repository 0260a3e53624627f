"""What mitmweb and the console show of metering: flow notes, marks and a contentview.

Every metered flow gets ``flow.metadata["metering"]`` (a plain JSON-able record), a
one-line ``flow.comment`` (mitmweb's Comment column; mitmdump logs it at info level) and,
when something needs a look, a mark: rejected locally (:no_entry:), failed upstream (:x:)
or charged from an estimate (:warning:).

The ``LLMStream`` contentview shows a streamed LLM response as its reassembled text plus
its usage. Streamed bodies are only kept with ``--set store_streamed_bodies=true``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from typing import Literal

from mitmproxy import contentviews
from mitmproxy import flow
from mitmproxy import http

from addons.admission import Ticket
from burnmeter.records import UsageRecord
from burnmeter.store.base import Settlement
from burnmeter.usage import StreamUsage
from burnmeter.usage import api_for

logger = logging.getLogger(__name__)

Outcome = Literal["charged", "failed", "rejected", "passthrough"]

MARKS: dict[str, str] = {
    "rejected": ":no_entry:",
    "failed": ":x:",
    "estimated": ":warning:",
}
USAGE_COUNTS = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


def describe(
    ticket: Ticket | None,
    outcome: Outcome,
    *,
    status: int | None = None,
    reason: str | None = None,
    usage: UsageRecord | None = None,
    settlement: Settlement | None = None,
) -> dict[str, Any]:
    """The flow's ``metadata["metering"]`` record: plain JSON types, money as a string."""
    record: dict[str, Any] = {"outcome": outcome, "status": status, "reason": reason}
    if ticket is not None:
        record |= {
            "user": ticket.user_id,
            "key": ticket.key_mask,
            "pool": ticket.pool,
            "model": ticket.quote.model if ticket.quote else ticket.model,
            "api": ticket.api,
            "stream": ticket.stream,
            "host": ticket.host,
            "upstream": ticket.upstream,
        }
    if ticket is not None and ticket.tap is not None and ticket.tap.usage.overflows:
        # events past max_event_bytes were passed on unread: a usage in one is not seen
        record["oversized_events"] = ticket.tap.usage.overflows
    if settlement is not None:
        record |= {field: getattr(usage, field, 0) for field in USAGE_COUNTS}
        record["total_tokens"] = usage.total_tokens if usage else 0
        record |= {
            "cost": str(settlement.cost),
            "billing_tokens": settlement.billing_tokens,
            "usage_source": usage.source if usage else "none",
        }
    return record


def usd(amount: Decimal) -> str:
    """``$0.0123``, ``$0.000213``: four decimals, or three significant digits below a cent
    (down to nano-USD), so that small costs stay apart."""
    if not amount:
        return "$0"
    places = min(9, max(4, 2 - amount.adjusted()))
    return f"${amount:,.{places}f}"


def comment(record: dict[str, Any]) -> str:
    """E.g. ``alice · gpt-4o · 1,234 tok · $0.000213 · openhands``."""
    parts = [record.get("user") or "anonymous"]
    if record["outcome"] == "rejected":
        return " · ".join([*parts, f"rejected: {record['reason']}"])
    if record.get("model"):
        parts.append(record["model"])
    if "cost" in record:
        parts += [f"{record['total_tokens']:,} tok", usd(Decimal(record["cost"]))]
    parts.append(record["pool"])
    if record.get("usage_source") == "estimated":
        parts.append("estimated")
    if record["outcome"] == "failed":
        parts.append(f"failed: {record['reason']}")
    return " · ".join(parts)


def annotate(f: http.HTTPFlow, record: dict[str, Any]) -> None:
    f.metadata["metering"] = record
    f.comment = comment(record)
    if record["outcome"] != "passthrough":
        logger.info("metering: %s", f.comment)
    kind = "estimated" if record.get("usage_source") == "estimated" else record["outcome"]
    if kind in MARKS:
        f.marked = MARKS[kind]


def usage_summary(flows: Sequence[flow.Flow]) -> str:
    """E.g. ``3 flows · 1,200/340 tokens · $0.0123`` over the flows metering charged."""
    records = [
        r for f in flows if isinstance(r := f.metadata.get("metering"), dict) and "cost" in r
    ]
    input_tokens = sum(
        r["input_tokens"] + r["cache_read_tokens"] + r["cache_write_tokens"] for r in records
    )
    output_tokens = sum(r["output_tokens"] for r in records)
    cost = sum((Decimal(r["cost"]) for r in records), Decimal(0))
    return f"{len(records)} flows · {input_tokens:,}/{output_tokens:,} tokens · {usd(cost)}"


def format_balances(balances: Iterable[tuple[str, Decimal]]) -> str:
    return " · ".join(f"{pool}: {usd(amount)}" for pool, amount in balances)


class LLMStreamContentview(contentviews.Contentview):
    """A streamed LLM response as reassembled text and usage."""

    @property
    def name(self) -> str:
        return "LLM Stream"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        stream = StreamUsage(_api(metadata) or "openai.chat", keep_text=True)
        stream.feed(data)
        usage, model = stream.result()
        text = "".join(stream.text or ())
        summary = f"--- {stream.events} events · model {model or '?'} · done={stream.done}"
        if usage is None:
            return f"{text}\n\n{summary}\nusage: none reported"
        counts = " · ".join(
            f"{f.removesuffix('_tokens')} {getattr(usage, f):,}" for f in USAGE_COUNTS
        )
        return f"{text}\n\n{summary}\nusage: {counts}"

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        is_sse = (metadata.content_type or "").startswith("text/event-stream")
        return 2 if is_sse and _api(metadata) else -1


def _api(metadata: contentviews.Metadata) -> str | None:
    if isinstance(metadata.flow, http.HTTPFlow):
        return api_for(metadata.flow.request.path)
    return None
