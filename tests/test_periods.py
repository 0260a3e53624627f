"""Windows and local buckets: midnight, half-hour offsets and DST change days."""

from __future__ import annotations

from datetime import UTC
from datetime import datetime
from datetime import timedelta

import pytest

from burnmeter.exceptions import PeriodError
from burnmeter.periods import MAX_BUCKETS
from burnmeter.periods import PERIODS
from burnmeter.periods import bucket_edges
from burnmeter.periods import bucket_index
from burnmeter.periods import day_start
from burnmeter.periods import parse_instant
from burnmeter.periods import window
from burnmeter.periods import zone

HCM = zone("Asia/Ho_Chi_Minh")
NY = zone("America/New_York")
HOWE = zone("Australia/Lord_Howe")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("period", "hours"),
    [("1h", 1), ("2h", 2), ("3h", 3), ("4h", 4), ("8h", 8), ("3d", 72), ("7d", 168), ("30d", 720)],
)
def test_rolling_windows_end_now(period: str, hours: int) -> None:
    now = utc("2025-03-10T03:00:00Z")
    w = window(period, HCM, now)
    assert (w.start, w.end, w.period) == (now - timedelta(hours=hours), now, period)


def test_all_has_no_lower_bound() -> None:
    w = window("all", HCM, utc("2025-03-10T03:00:00Z"))
    assert (w.start, w.start_ms, w.local_start) == (None, None, None)
    assert w.end_ms == 1741575600000


def test_default_period_is_today() -> None:
    assert window(None, HCM, utc("2025-03-10T03:00:00Z")).period == "24h"


@pytest.mark.parametrize(
    ("tz", "now", "start"),
    [
        # Vietnam, UTC+7: around local midnight
        ("Asia/Ho_Chi_Minh", "2025-03-10T10:00+07:00", "2025-03-09T17:00Z"),
        ("Asia/Ho_Chi_Minh", "2025-03-09T23:59:59+07:00", "2025-03-08T17:00Z"),
        ("Asia/Ho_Chi_Minh", "2025-03-10T00:00:00+07:00", "2025-03-09T17:00Z"),
        ("Asia/Ho_Chi_Minh", "2025-03-09T16:59:59Z", "2025-03-08T17:00Z"),  # UTC date ≠ local date
        ("Asia/Kolkata", "2025-03-10T08:30+05:30", "2025-03-09T18:30Z"),
        ("Asia/Kathmandu", "2025-03-10T08:30+05:45", "2025-03-09T18:15Z"),
        # New York: spring forward (23 h day) and fall back (25 h day)
        ("America/New_York", "2025-03-09T12:00-04:00", "2025-03-09T05:00Z"),
        ("America/New_York", "2025-11-02T12:00-05:00", "2025-11-02T04:00Z"),
        ("America/New_York", "2025-11-02T01:30-05:00", "2025-11-02T04:00Z"),  # the second 01:30
        # Lord Howe: a 30-minute DST shift (ends 2025-04-06 02:00 +11 → 01:30 +10:30)
        ("Australia/Lord_Howe", "2025-04-06T12:00+10:30", "2025-04-05T13:00Z"),
        # Santiago: DST starts at midnight, so 2024-09-08 begins at 01:00 -03
        ("America/Santiago", "2024-09-08T12:00-03:00", "2024-09-08T04:00Z"),
    ],
)
def test_today_starts_at_the_first_instant_of_the_local_date(tz: str, now: str, start: str) -> None:
    w = window("24h", zone(tz), utc(now))
    assert w.start == utc(start)
    assert w.end == utc(now)
    assert w.local_start is not None and w.local_start.date() == w.local_end.date()


def test_day_start_lengths_on_dst_days() -> None:
    assert day_start(utc("2025-03-10T12:00Z"), NY) - day_start(
        utc("2025-03-09T12:00Z"), NY
    ) == timedelta(hours=23)
    assert day_start(utc("2025-11-03T12:00Z"), NY) - day_start(
        utc("2025-11-02T12:00Z"), NY
    ) == timedelta(hours=25)


def test_window_describe_uses_the_zone() -> None:
    w = window("24h", HCM, utc("2025-03-10T03:00Z"))
    assert w.describe() == "24h: 2025-03-10 00:00 → 2025-03-10 10:00 (Asia/Ho_Chi_Minh)"
    assert (
        window("all", HCM, utc("2025-03-10T03:00Z")).describe().startswith("all: the first log →")
    )


def test_unknown_period_lists_the_valid_ones() -> None:
    with pytest.raises(PeriodError) as e:
        window("5h", HCM)
    assert all(p in str(e.value) for p in PERIODS)


def test_custom_range() -> None:
    now = utc("2025-03-10T03:00Z")
    since = parse_instant("2025-03-01", HCM)
    w = window(None, HCM, now, since=since)
    assert (w.period, w.start, w.end) == ("custom", utc("2025-02-28T17:00Z"), now)
    until_only = window(None, HCM, now, until=parse_instant("2025-03-02T00:00Z", HCM))
    assert (until_only.start, until_only.end) == (None, utc("2025-03-02T00:00Z"))
    with pytest.raises(PeriodError, match="not both"):
        window("24h", HCM, now, since=since)
    with pytest.raises(PeriodError, match="earlier"):
        window(None, HCM, now, since=now, until=now)


def test_parse_instant() -> None:
    assert parse_instant("2025-03-10T07:00", HCM) == utc("2025-03-10T00:00Z")
    assert parse_instant("2025-03-10T07:00Z", HCM) == utc("2025-03-10T07:00Z")
    assert parse_instant("2025-03-10T07:00+05:30", HCM) == utc("2025-03-10T01:30Z")
    assert parse_instant("2025-11-02T01:30", NY) == utc("2025-11-02T05:30Z")  # the first 01:30
    with pytest.raises(PeriodError, match="ISO 8601"):
        parse_instant("yesterday", HCM)


def test_unknown_zone() -> None:
    with pytest.raises(PeriodError, match="Mars/Olympus"):
        zone("Mars/Olympus")


def _local(edges: list[datetime], tz: object) -> list[str]:
    return [e.astimezone(tz).isoformat(timespec="minutes") for e in edges]  # type: ignore[arg-type]


def test_hour_buckets_on_dst_days() -> None:
    spring = window("24h", NY, utc("2025-03-10T03:59Z"))  # 23:59 EDT on 03-09
    edges = bucket_edges(spring.start, spring.end, NY, "hour")  # type: ignore[arg-type]
    assert len(edges) - 1 == 23
    assert _local(edges[1:4], NY) == [
        "2025-03-09T01:00-05:00",
        "2025-03-09T03:00-04:00",
        "2025-03-09T04:00-04:00",
    ]
    fall = window("24h", NY, utc("2025-11-03T04:59Z"))  # 23:59 EST on 11-02
    edges = bucket_edges(fall.start, fall.end, NY, "hour")  # type: ignore[arg-type]
    assert len(edges) - 1 == 25
    assert _local(edges[1:4], NY) == [
        "2025-11-02T01:00-04:00",
        "2025-11-02T01:00-05:00",
        "2025-11-02T02:00-05:00",
    ]


def test_hour_buckets_lord_howe_half_hour_shift() -> None:
    w = window("24h", HOWE, utc("2025-04-06T12:00+10:30"))
    edges = bucket_edges(w.start, w.end, HOWE, "hour")  # type: ignore[arg-type]
    assert _local(edges[:5], HOWE) == [
        "2025-04-06T00:00+11:00",
        "2025-04-06T01:00+11:00",
        "2025-04-06T01:30+10:30",  # the repeated half hour is a bucket of its own
        "2025-04-06T02:00+10:30",
        "2025-04-06T03:00+10:30",
    ]


def test_hour_buckets_in_a_half_hour_zone_start_on_the_local_hour() -> None:
    kolkata = zone("Asia/Kolkata")
    edges = bucket_edges(utc("2025-03-10T00:10Z"), utc("2025-03-10T02:00Z"), kolkata, "hour")
    assert [e.isoformat() for e in edges] == [
        "2025-03-09T23:30:00+00:00",
        "2025-03-10T00:30:00+00:00",
        "2025-03-10T01:30:00+00:00",
        "2025-03-10T02:30:00+00:00",
    ]


def test_day_buckets_cover_the_window_and_follow_dst() -> None:
    start, end = utc("2025-03-08T15:00Z"), utc("2025-03-10T15:00Z")
    edges = bucket_edges(start, end, NY, "day")
    assert _local(edges, NY) == [
        "2025-03-08T00:00-05:00",
        "2025-03-09T00:00-05:00",
        "2025-03-10T00:00-04:00",
        "2025-03-11T00:00-04:00",
    ]
    assert bucket_index(edges, utc("2025-03-10T03:59Z")) == 1  # 23:59 EDT on 03-09
    assert bucket_index(edges, utc("2025-03-10T04:00Z")) == 2


def test_bucket_edges_refuse_more_than_max_buckets() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    hours = bucket_edges(start, start + timedelta(hours=MAX_BUCKETS), zone("UTC"), "hour")
    assert len(hours) == MAX_BUCKETS + 1
    with pytest.raises(PeriodError, match="more than 10,000 hours"):
        bucket_edges(start, start + timedelta(hours=MAX_BUCKETS + 1), zone("UTC"), "hour")
    with pytest.raises(PeriodError, match="days"):
        bucket_edges(start, start + timedelta(days=MAX_BUCKETS + 1), zone("UTC"), "day")


def test_24h_at_the_first_instant_datetime_knows_is_an_error() -> None:
    with pytest.raises(PeriodError, match="too early") as e:
        window("24h", zone("Asia/Ho_Chi_Minh"), datetime(1, 1, 1, tzinfo=UTC))
    assert e.value.source == "now"
