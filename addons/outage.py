"""What admission must know of an outage: is the store down, can the journal take one more.

A failed or slow store call marks the store down for ``STORE_RETRY`` seconds, and so does a
writer whose settlements are not getting through (``SettlementWriter.stalled``); meanwhile
admission does not wait for the store. The journal must be able to take the settlement of
every request in flight: a new metered request is refused once it could not take one more
for each (``RECORD_RESERVE`` bytes), so the journal never has to refuse a finished request;
and while a journal write fails (a full disk, an I/O error) until a probe write succeeds.

One ``Outage`` per running configuration, owned by the metering addon, asked by admission.
"""

from __future__ import annotations

import logging
import time
import weakref

from mitmproxy import http

from addons import errors
from addons.exceptions import Rejection
from burnmeter.writer import SettlementWriter

logger = logging.getLogger(__name__)

STORE_TIMEOUT = 1.0
"""Seconds admission waits for one store call (key look-up, hold); a settlement waiting on
the store longer marks it down too."""
STORE_RETRY = 2.0
"""Seconds a failed store call marks the store down for admission."""
RECORD_RESERVE = 4096
"""Journal bytes kept free for each request in flight (a record is about 1 KiB)."""


class Outage:
    def __init__(self, writer: SettlementWriter, in_flight: weakref.WeakSet[http.HTTPFlow]):
        """``in_flight``: the flows forwarded and not yet settled, kept by the addon (it
        outlives a reconfiguration, as they do); each has journal room kept for it."""
        self.writer = writer
        self.in_flight = in_flight
        self._down_until = 0.0

    @property
    def store_down(self) -> bool:
        return time.monotonic() < self._down_until or self.writer.stalled(STORE_TIMEOUT)

    def mark_down(self, error: Exception) -> None:
        """A store call failed or was given up (``error``): no store calls for a while."""
        if not self.store_down:
            logger.warning("metering: store unavailable for admission: %s", error)
        self._down_until = time.monotonic() + STORE_RETRY

    def journal_has_room(self) -> bool:
        """Room for one more record per request in flight, the one asking included."""
        journal = self.writer.journal
        reserve = (len(self.in_flight) + 1) * RECORD_RESERVE
        return journal.size + reserve <= journal.max_bytes

    def refusal(self) -> Rejection | None:
        """Why a new metered request must not be forwarded now, None if it may be."""
        if not self.writer.journal.probe():
            # its settlement could not be journaled: refuse rather than serve it uncharged
            return Rejection(errors.UNAVAILABLE, "Metering journal cannot be written, retry later")
        if not self.journal_has_room():
            return Rejection(
                errors.UNAVAILABLE, "Metering store unreachable and journal full, retry later"
            )
        return None
