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

from addons.phases import Admitted
from addons.phases import Authenticated
from addons.phases import Quoted
from addons.phases import Settled
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
    phase: Authenticated | None,
    outcome: Outcome,
    *,
    status: int | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """The flow's ``metadata["metering"]`` record: plain JSON types, money as a string;
    ``phase``: what was known of the request (None: not even who calls)."""
    record: dict[str, Any] = {"outcome": outcome, "status": status, "reason": reason}
    if phase is None:
        return record
    quoted = phase if isinstance(phase, Quoted) else None
    record |= {
        "user": phase.user_id,
        "key": phase.key_mask,
        "pool": phase.pool,
        "model": quoted.quote.model if quoted else None,
        "api": phase.api,
        "stream": quoted is not None and quoted.stream,
        "host": phase.host,
        "upstream": phase.upstream,
    }
    tap = phase.tap if isinstance(phase, Admitted) else None
    if tap is not None and tap.usage.overflows:
        # events past max_event_bytes were passed on unread: a usage in one is not seen
        record["oversized_events"] = tap.usage.overflows
    return record


def describe_settled(settled: Settled) -> dict[str, Any]:
    """``describe`` of a settled request, with its usage and charge."""
    usage, settlement = settled.usage, settled.settlement
    outcome: Outcome = "charged" if usage else "failed"
    record = describe(settled.phase, outcome, status=settled.status, reason=settled.reason)
    record |= {field: getattr(usage, field, 0) for field in USAGE_COUNTS}
    record["total_tokens"] = usage.total_tokens if usage else 0
    record |= {
        "cost": str(settlement.cost),
        "billing_tokens": settlement.billing_tokens,
        "usage_source": usage.source if usage else "none",
    }
    phase = settled.phase
    if isinstance(phase, Admitted) and phase.hold is None:
        record["holdless"] = True  # admitted while the store was down
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
