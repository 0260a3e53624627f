"""A store for the admin server's tests, and what every period must show, worked out by hand.

Reporting zone Asia/Ho_Chi_Minh (UTC+7, no DST); "now" is 2025-03-10 10:00 local. The logs
sit on both sides of each window's edge: local midnight (the 24h window starts there, so a
log at 23:59:59 the evening before is out although a rolling 24 hours would hold it), legacy
logs without ``creditType`` or with a null one (they are "Burned", never "New Burned"), a
failed request, an operator request without a user, and one log after "now".

The expectations below never call burnmeter's period code: each window's start is written
out, and the sums are plain Python over the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

D = Decimal
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
NOW = datetime(2025, 3, 10, 10, 0, tzinfo=HCM)
NOW_PARAM = "2025-03-10T10:00"  # as the URL gives it: local to the reporting zone
MISSING = "missing"  # no creditType field at all

CONFIG = """\
timezone = "Asia/Ho_Chi_Minh"
log_ttl_days = 1

[pools.openhands]
balance = ["creditsNew"]
used = "creditsNewUsed"

[pools.ohmygpt]
balance = ["credits", "refCredits"]
used = "creditsUsed"
"""

USER_DOCS: list[dict[str, Any]] = [
    {"_id": "alice", "isActive": True, "credits": D("10"), "refCredits": D("2.5"),
     "creditsNew": D("5")},
    {"_id": "bob", "isActive": True, "credits": D("0"), "refCredits": D("0"),
     "creditsNew": D("7.25")},
    {"_id": "carol", "isActive": True, "credits": D("0"), "refCredits": D("0"),
     "creditsNew": D("0")},
    {"_id": "dave", "isActive": False, "credits": D("1"), "creditsNew": D("0")},
    {"_id": "eve", "isActive": True, "credits": D("1234.5"), "creditsNew": D("0")},
]  # fmt: skip


@dataclass(frozen=True)
class SeedLog:
    at: datetime  # local
    user: str | None
    pool: str | None  # MISSING: no creditType field; None: creditType null
    cost: Decimal
    tokens: tuple[int, int]
    model: str = "claude-sonnet-4-5"
    ok: bool = True
    latency: int = 1000

    @property
    def pool_charged(self) -> str:
        """What the report must count it as: legacy logs bill ohmygpt."""
        return "ohmygpt" if self.pool in (MISSING, None) else str(self.pool)


def _at(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 3) -> datetime:
    return datetime(2025, month, day, hour, minute, second, tzinfo=HCM)


LOGS = [
    SeedLog(_at(10, 9, 40), "alice", "ohmygpt", D("1.2345"), (1200, 300), latency=800),
    SeedLog(_at(10, 9, 55), None, "ohmygpt", D("0.01"), (10, 1), model="gpt-5-mini"),
    SeedLog(_at(10, 9, 10), "bob", "openhands", D("0.5"), (2000, 100), model="gpt-5"),
    SeedLog(_at(10, 8, 30), "alice", MISSING, D("0.25"), (300, 30), latency=1500),
    SeedLog(_at(10, 7, 45), "carol", "openhands", D("2"), (5000, 500), model="gpt-5"),
    SeedLog(_at(10, 6, 30), "dave", None, D("0.125"), (125, 12)),
    SeedLog(_at(10, 4, 0), "bob", "ohmygpt", D("3"), (4000, 0), ok=False, latency=30000),
    SeedLog(_at(10, 0, 0, 0), "alice", MISSING, D("0.0625"), (62, 6)),  # local midnight: in 24h
    SeedLog(_at(9, 23, 59, 59), "bob", "openhands", D("4.5"), (4500, 450)),  # not in 24h
    SeedLog(_at(9, 12, 0), "carol", "ohmygpt", D("0.75"), (750, 75), model="gemini-2.5-pro"),
    SeedLog(_at(8, 9, 0), "dave", MISSING, D("1.5"), (1500, 150)),
    SeedLog(_at(5, 10, 0), "alice", "openhands", D("10"), (10000, 1000), model="gpt-5"),
    SeedLog(_at(20, 10, 0, month=2), "bob", "ohmygpt", D("20"), (20000, 2000)),
    SeedLog(_at(1, 10, 0, month=12).replace(year=2024), "carol", MISSING, D("100"), (1, 1)),
    SeedLog(_at(10, 10, 30), "alice", "ohmygpt", D("50"), (1, 1)),  # after now: never counted
]

# Where each period starts, written out (None: no lower bound); every window ends at NOW.
WINDOW_STARTS: dict[str, datetime | None] = {
    "1h": _at(10, 9, 0),
    "2h": _at(10, 8, 0),
    "3h": _at(10, 7, 0),
    "4h": _at(10, 6, 0),
    "8h": _at(10, 2, 0),
    "24h": _at(10, 0, 0),  # local midnight, not 10:00 yesterday
    "3d": _at(7, 10, 0),
    "7d": _at(3, 10, 0),
    "30d": _at(8, 10, 0, month=2),
    "all": None,
}


def log_docs() -> list[dict[str, Any]]:
    docs = []
    for n, log in enumerate(LOGS):
        doc: dict[str, Any] = {
            "_id": f"seed-{n:02d}",
            "model": log.model,
            "inputTokens": log.tokens[0],
            "outputTokens": log.tokens[1],
            "tokensUsed": sum(log.tokens),
            "creditsCost": log.cost,
            "statusCode": 200 if log.ok else 502,
            "isSuccess": log.ok,
            "latencyMs": log.latency,
            "createdAt": log.at.astimezone(UTC),
        }
        if log.user is not None:
            doc["userId"] = log.user
        if log.pool != MISSING:
            doc["creditType"] = log.pool
        docs.append(doc)
    return docs


def in_window(period: str, log: SeedLog) -> bool:
    start = WINDOW_STARTS[period]
    return (start is None or log.at >= start) and log.at < NOW


def expected_summary(period: str) -> dict[str, Any]:
    """The summary fields the dashboard shows, from the seed alone."""
    logs = [log for log in LOGS if in_window(period, log)]
    burned = {pool: sum((g.cost for g in logs if g.pool_charged == pool), D(0))
              for pool in ("openhands", "ohmygpt")}  # fmt: skip
    funded = {u["_id"] for u in USER_DOCS
              if u.get("credits", 0) + u.get("refCredits", 0) > 0 or u.get("creditsNew", 0) > 0}  # fmt: skip
    timed = [g.latency for g in logs]
    return {
        "total_users": len(USER_DOCS),
        "total_credits": sum((u.get("credits", D(0)) for u in USER_DOCS), D(0)),
        "total_ref_credits": sum((u.get("refCredits", D(0)) for u in USER_DOCS), D(0)),
        "total_creditsNew": sum((u.get("creditsNew", D(0)) for u in USER_DOCS), D(0)),
        "total_credits_used": burned["ohmygpt"],
        "total_creditsNewUsed": burned["openhands"],
        "total_burned": burned["ohmygpt"] + burned["openhands"],
        "burned_by_pool.openhands": burned["openhands"],
        "burned_by_pool.ohmygpt": burned["ohmygpt"],
        "total_input_tokens": sum(g.tokens[0] for g in logs),
        "total_output_tokens": sum(g.tokens[1] for g in logs),
        "requests": len(logs),
        "success_rate": round(100 * sum(g.ok for g in logs) / len(logs), 2) if logs else None,
        "avg_latency_ms": int(D(sum(timed)) / len(timed) + D("0.5")) if timed else None,
        "active_users": len(funded)
        if period == "all"
        else len({g.user for g in logs if g.user is not None}),
    }


def window_start_iso(period: str) -> str:
    start = WINDOW_STARTS[period]
    return "" if start is None else start.isoformat()
