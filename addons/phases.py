"""The phases of one metered request, each an immutable record that the next phase extends.

    Authenticated   ``requestheaders``: who calls (owner, key mask), the route and the pool
                    it bills, where the request goes; never the client's key
    Quoted          ``request``, the body read: the model, its estimate and price quote, and
                    the pool that pays (a model may bill a pool of its own); its hold asked
    Admitted        ``request``, the hold made (or none: a hold-less admission in a store
                    outage) and the output limit forwarded; from ``responseheaders`` on, the
                    same with the stream tap the answer runs through
    Settled         the end: the charge journaled and the usage it was priced from

Each phase is a subclass of the one before, so what needs only the caller takes any of
them, and what needs a price or a hold asks for that type: no field stands empty for a
phase that has not happened. The metering addon keeps each flow's latest record and
replaces it (``quoted``, ``admitted``, ``answered``), never changes one in place.

The client's key is in no record: admission is handed it as an argument, and the addon
keeps it only until the flow's admission is done.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from addons.canonical import CanonicalRequest
from addons.errors import Style
from addons.streamtap import StreamTap
from burnmeter.config import Route
from burnmeter.estimate import RequestEstimate
from burnmeter.pricing import PriceQuote
from burnmeter.records import UsageRecord
from burnmeter.store.base import Hold
from burnmeter.store.base import KeyOwner
from burnmeter.store.base import Settlement


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticated:
    """What authentication knows of a request (``requestheaders``)."""

    api: str | None
    """The metered API, or None for a path that is passed through uncharged."""
    style: Style
    path: str
    host: str
    """The client-facing host and port, as ``addons.canonical`` reads them."""
    upstream: str
    owner: KeyOwner
    key_mask: str
    route: Route
    pool: str
    """The pool that pays: the route's, until the price quote names one of its own."""
    request: CanonicalRequest
    key_cached: bool
    """The key was in the key cache: it may be admitted without a hold in an outage."""

    @property
    def user_id(self) -> str:
        return self.owner.user_id


@dataclass(frozen=True, slots=True, kw_only=True)
class Quoted(Authenticated):
    """What admission read from the body and priced, before its hold (``request``)."""

    api: str
    """Only metered requests are priced."""
    model: str
    """The model the request names (``quote.model`` is the config's name for it)."""
    estimate: RequestEstimate
    quote: PriceQuote

    @property
    def stream(self) -> bool:
        return self.estimate.stream


@dataclass(frozen=True, slots=True, kw_only=True)
class Admitted(Quoted):
    """A request admission forwarded (``request``) and, once its answer began, the tap that
    answer runs through (``responseheaders``)."""

    hold: Hold | None
    """None: admitted without a hold while the store was down (charged by the writer)."""
    output_tokens_paid: int | None
    """The output limit per choice the request was forwarded with (``cap_output_tokens``)."""
    tap: StreamTap | None = None
    """The stream tap of a streamed answer, from ``responseheaders`` on."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settled:
    """What settling a priced request produced: its charge, journaled (or refused and kept
    for the journal), and the usage it was priced from (None: nothing to charge)."""

    phase: Quoted
    """The request as settled: ``Admitted``, or ``Quoted`` for one whose hold was still
    under way when the proxy shut down."""
    usage: UsageRecord | None
    settlement: Settlement
    status: int
    reason: str | None


def quoted(
    authenticated: Authenticated,
    api: str,
    model: str,
    estimate: RequestEstimate,
    quote: PriceQuote,
) -> Quoted:
    """``authenticated`` priced; the quote's own pool, if it names one, pays."""
    carried = _fields(authenticated, _AUTHENTICATED) | {
        "api": api,
        "pool": quote.pool or authenticated.pool,
    }
    return Quoted(**carried, model=model, estimate=estimate, quote=quote)


def admitted(quoted: Quoted, hold: Hold | None, output_tokens_paid: int | None) -> Admitted:
    """``quoted`` with its hold made (None: hold-less), before any answer."""
    return Admitted(**_fields(quoted, _QUOTED), hold=hold, output_tokens_paid=output_tokens_paid)


def answered(admitted: Admitted, tap: StreamTap) -> Admitted:
    """``admitted`` with the stream tap its answer runs through (``responseheaders``)."""
    return Admitted(**_fields(admitted, _ADMITTED), tap=tap)


def _names(phase: type[Authenticated]) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(phase))


# read once: building the next phase is on every request's path
_AUTHENTICATED = _names(Authenticated)
_QUOTED = _names(Quoted)
_ADMITTED = tuple(name for name in _names(Admitted) if name != "tap")


def _fields(record: Authenticated, names: tuple[str, ...]) -> dict[str, Any]:
    """The fields ``names`` of ``record``, to build the next phase from."""
    return {name: getattr(record, name) for name in names}
