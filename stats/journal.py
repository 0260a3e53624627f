"""``burnmeter journal replay FILE``: apply settlements the proxy set aside.

Two kinds of records end up outside the journal, each for an operator to apply once the
cause is fixed: settlements the journal refused (a full disk, an I/O error), which the
proxy logs as one ERROR line each (``metering: settlement not journaled (...): {...}``),
and records the store refused, which the writer moves to ``<journal>.rejected`` (one JSON
line each). FILE may be either, or a whole proxy log: every line that carries a record is
applied, every other line is skipped. Settling is idempotent by request id, so a record
applied before (by the proxy, or an earlier replay) is reported ``already`` and charged
once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING
from typing import BinaryIO
from typing import Literal

import click

from burnmeter.exceptions import StoreError
from burnmeter.journal import from_json
from burnmeter.store.base import Settlement
from burnmeter.store.base import Store
from stats.output import emit_rows
from stats.output import format_option

if TYPE_CHECKING:
    from stats.context import Context

RECORD_START = '{"request_id"'
"""Where a record begins on a line: the journal's own encoding puts ``request_id`` first."""
COLUMNS = ("line", "request_id", "user_id", "pool", "cost", "outcome", "reason")

Outcome = Literal["applied", "already", "failed"]


@dataclass(frozen=True, slots=True)
class Replayed:
    line: int
    request_id: str | None
    user_id: str | None
    pool: str | None
    cost: Decimal | None
    outcome: Outcome
    reason: str | None = None


def records(lines: Iterable[bytes]) -> Iterator[tuple[int, Settlement | str]]:
    """(line number, settlement or why it cannot be read) of each line carrying a record."""
    decoder = json.JSONDecoder()
    for number, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", "replace")
        start = text.find(RECORD_START)
        if start < 0:
            continue
        try:
            _, end = decoder.raw_decode(text, start)  # the record, without what follows it
            yield number, from_json(text[start:end])
        except (ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as e:
            yield number, f"not a settlement record: {e}"


def replay(lines: Iterable[bytes], store: Store) -> list[Replayed]:
    """Apply each record once; a store outage stops the replay (raises ``StoreError``)."""
    done: list[Replayed] = []
    for number, record in records(lines):
        if isinstance(record, str):
            done.append(Replayed(number, None, None, None, None, "failed", record))
            continue
        s = record
        try:
            [applied] = store.settle([s])
        except StoreError:
            raise
        except Exception as e:  # this record only: its pool is gone, its user refused it
            failed = Replayed(number, s.request_id, s.user_id, s.pool, s.cost, "failed", repr(e))
            done.append(failed)
            continue
        outcome: Outcome = "applied" if applied else "already"
        done.append(Replayed(number, s.request_id, s.user_id, s.pool, s.cost, outcome))
    return done


@click.group("journal")
def journal_group() -> None:
    """Settlements kept outside the store's journal."""


@journal_group.command("replay")
@click.argument("file", type=click.File("rb"))
@format_option
@click.pass_obj
def replay_command(state: Context, file: BinaryIO, fmt: str) -> None:
    """Apply the settlements in FILE: the proxy's ERROR lines ("settlement not journaled")
    or a <journal>.rejected file; `-` reads standard input.

    Each record is applied once (idempotent by request id): one applied before, by the
    proxy or an earlier replay, is reported `already`. A record the store refuses is
    reported `failed` with the reason, and the others are still applied.

    Exit status: 0 when no record failed, 1 when some did.
    """
    done = replay(file, state.store)
    rows = [
        {
            "line": r.line,
            "request_id": r.request_id,
            "user_id": r.user_id,
            "pool": r.pool,
            "cost": r.cost,
            "outcome": r.outcome,
            "reason": r.reason,
        }
        for r in done
    ]
    emit_rows(rows, COLUMNS, fmt)
    if any(r.outcome == "failed" for r in done):
        raise click.exceptions.Exit(1)
