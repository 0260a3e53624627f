"""Report windows and local-time buckets: every piece of calendar arithmetic, in one place.

A window is the half-open UTC interval ``[start, end)``; ``start`` is None for ``all``.

- ``1h 2h 3h 4h 8h 3d 7d 30d``: rolling, ending now.
- ``24h``: since 00:00:00 today in the reporting zone (the first instant of the local date,
  which is not always 00:00 on a DST change day), ending now.
- ``all``: no lower bound, ending now.
- ``custom``: ``--since``/``--until``; a naive time is read in the reporting zone.

Buckets (``hour``/``day``) are local hours and days of the reporting zone. Stores group
logs by ``SLOT`` (15 minutes of UTC); the slots are then folded into buckets here. Every
UTC offset and DST change in the tz database since 1972 falls on a 15-minute boundary, so
the folding is exact for any IANA zone (half-hour offsets and Lord Howe's 30-minute DST
included).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import time
from datetime import timedelta
from typing import Literal
from zoneinfo import ZoneInfo

from burnmeter.config import iana_zone
from burnmeter.exceptions import PeriodError
from burnmeter.store.extjson import from_ms
from burnmeter.store.extjson import to_ms

ROLLING: dict[str, timedelta] = {
    "1h": timedelta(hours=1),
    "2h": timedelta(hours=2),
    "3h": timedelta(hours=3),
    "4h": timedelta(hours=4),
    "8h": timedelta(hours=8),
    "3d": timedelta(days=3),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
TODAY = "24h"
ALL = "all"
CUSTOM = "custom"
PERIODS = (*list(ROLLING)[:5], TODAY, *list(ROLLING)[5:], ALL)

Bucket = Literal["hour", "day"]
BUCKETS: tuple[Bucket, ...] = ("hour", "day")
SLOT = timedelta(minutes=15)
SLOT_MS = SLOT // timedelta(milliseconds=1)
MAX_BUCKETS = 10_000  # 416 days of hours, 27 years of days: more is a mistake, or an attack
BUCKET_SPAN: dict[Bucket, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}


@dataclass(frozen=True, slots=True)
class Window:
    """``[start, end)`` in aware UTC, with the zone the report is read in."""

    period: str
    start: datetime | None
    end: datetime
    zone: ZoneInfo

    @property
    def start_ms(self) -> int | None:
        return None if self.start is None else to_ms(self.start)

    @property
    def end_ms(self) -> int:
        return to_ms(self.end)

    @property
    def local_start(self) -> datetime | None:
        return None if self.start is None else self.start.astimezone(self.zone)

    @property
    def local_end(self) -> datetime:
        return self.end.astimezone(self.zone)

    def describe(self) -> str:
        """``24h: 2025-01-02 00:00 → 2025-01-02 15:30 (Asia/Ho_Chi_Minh)``, for titles."""
        start = self.local_start
        since = "the first log" if start is None else f"{start:%Y-%m-%d %H:%M}"
        return f"{self.period}: {since} → {self.local_end:%Y-%m-%d %H:%M} ({self.zone.key})"


def zone(name: str) -> ZoneInfo:
    found = iana_zone(name)
    if found is None:
        raise PeriodError(f"unknown time zone {name!r} (an IANA name such as Asia/Ho_Chi_Minh)")
    return found


def parse_instant(text: str, tz: ZoneInfo) -> datetime:
    """ISO 8601 date or date-time as aware UTC; without an offset it is local to ``tz``."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise PeriodError(
            f"{text!r} is not an ISO 8601 time (2025-01-31T18:00 or 2025-01-31T18:00+07:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise PeriodError(f"{text!r} is out of range") from None


def day_start(moment: datetime, tz: ZoneInfo) -> datetime:
    """The first instant of ``moment``'s local date, in UTC.

    A naive local midnight resolves with fold=0: inside a DST gap that is the instant the
    clocks jumped, i.e. the first instant of the day; when midnight repeats, the first one."""
    return local_midnight(moment.astimezone(tz).date(), tz)


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def now_utc() -> datetime:
    """Now, to the millisecond (the stores' resolution)."""
    return from_ms(to_ms(datetime.now(UTC)))


def window(
    period: str | None,
    tz: ZoneInfo,
    now: datetime | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Window:
    """The window a period (or a custom ``since``/``until`` range) names at ``now``."""
    end_now = (now or now_utc()).astimezone(UTC)
    if period in ROLLING and end_now - datetime.min.replace(tzinfo=UTC) < ROLLING[period]:
        raise PeriodError(f"--now is too early for a {period} window")
    if since is not None or until is not None:
        if period is not None:
            raise PeriodError("give either a period or --since/--until, not both")
        end = (until or end_now).astimezone(UTC)
        start = None if since is None else since.astimezone(UTC)
        if start is not None and start >= end:
            raise PeriodError("--since must be earlier than --until (or now)")
        return Window(CUSTOM, start, end, tz)
    period = period or TODAY
    if period in ROLLING:
        return Window(period, end_now - ROLLING[period], end_now, tz)
    if period == TODAY:
        try:
            return Window(period, day_start(end_now, tz), end_now, tz)
        except OverflowError:  # the local date of year 1 began before datetime can say
            raise PeriodError("--now is too early for a 24h window", "now") from None
    if period == ALL:
        return Window(period, None, end_now, tz)
    raise PeriodError(f"unknown period {period!r}; valid: {', '.join(PERIODS)}")


def requested_window(
    period: str | None,
    tz: str | None,
    now: str | None,
    since: str | None,
    until: str | None,
    default_zone: ZoneInfo,
) -> Window:
    """The window that a report's inputs name as text (CLI options, query parameters)."""
    try:
        reporting = zone(tz) if tz else default_zone
    except PeriodError as e:
        raise PeriodError(str(e), "tz") from None

    def instant(text: str | None, source: str) -> datetime | None:
        try:
            return None if text is None else parse_instant(text, reporting)
        except PeriodError as e:
            raise PeriodError(str(e), source) from None

    return window(
        period, reporting, instant(now, "now"), instant(since, "since"), instant(until, "until")
    )


def bucket_key(moment: datetime, tz: ZoneInfo, unit: Bucket) -> tuple[object, ...]:
    """Which local hour or day an instant belongs to.

    An hour is the local wall-clock hour *and* its UTC offset, so the repeated hour of a
    DST fall-back is two buckets; a day is the local date (23, 24 or 25 hours long)."""
    local = moment.astimezone(tz)
    if unit == "day":
        return (local.date(),)
    return (local.replace(minute=0, second=0, microsecond=0, tzinfo=None), local.utcoffset())


def bucket_edges(start: datetime, end: datetime, tz: ZoneInfo, unit: Bucket) -> list[datetime]:
    """Boundaries of the local buckets that meet ``[start, end)``: n+1 edges for n buckets.

    The first edge is the start of the bucket holding ``start`` (it may lie before
    ``start``); the last is the end of the bucket holding the last instant before ``end``.
    More than ``MAX_BUCKETS`` is a ``PeriodError`` (the walk below is per 15 minutes)."""
    if (end - start) / BUCKET_SPAN[unit] > MAX_BUCKETS:
        raise PeriodError(
            f"more than {MAX_BUCKETS:,} {unit}s from {start.date()} to {end.date()}: "
            "choose a shorter window" + (" or days" if unit == "hour" else "")
        )
    t = _slot_floor(start)
    key = bucket_key(t, tz, unit)
    while bucket_key(t - SLOT, tz, unit) == key:
        t -= SLOT
    edges = [t]
    while True:
        t += SLOT
        new = bucket_key(t, tz, unit)
        if new != key:
            edges.append(t)
            if t >= end:
                return edges
            key = new


def bucket_index(edges: list[datetime], moment: datetime) -> int:
    """The bucket (0-based) that holds ``moment``, given ``bucket_edges``."""
    return bisect.bisect_right(edges, moment) - 1


def _slot_floor(moment: datetime) -> datetime:
    ms = to_ms(moment)
    return from_ms(ms - ms % SLOT_MS)
