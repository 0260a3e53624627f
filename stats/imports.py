"""``burnmeter import users|logs FILE``: the original's MongoDB data, from mongoexport output
(``docs/documents.md``, "Compatibility with the original system").

Each line is decoded (Extended JSON, ``burnmeter.store.extjson``), its known fields
type-checked, its money made exact ``Decimal`` USD, and handed to the store whole or not
at all. A document whose ``_id`` is already stored is skipped, and so is a log older than
the retention (the proxy would delete it): importing a file twice adds nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timedelta
from decimal import Decimal
from typing import Any
from typing import BinaryIO

import click
from bson import ObjectId
from bson.errors import BSONError

from burnmeter import schema
from burnmeter.config import Pool
from burnmeter.documents import mask_key
from burnmeter.documents import utcnow
from burnmeter.money import NANOS_PER_USD
from burnmeter.money import to_decimal
from burnmeter.store import extjson
from burnmeter.store.base import Document
from burnmeter.store.base import ImportOutcome
from burnmeter.store.base import Store
from stats.context import Context
from stats.exceptions import BadLine
from stats.output import emit_record
from stats.output import format_option

SHOWN_LINES = 10
"""Line numbers an import names in a message before it only counts them."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """What a known field may hold (null aside): a name for messages and Python types."""

    name: str
    types: tuple[type, ...]

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool):  # bool is an int to Python, not to MongoDB
            return bool in self.types
        return isinstance(value, self.types)


STRING = Accepted("a string", (str,))
NUMBER = Accepted("a number", (int, float))
DATE = Accepted('a date ({"$date": ...})', (datetime,))
BOOLEAN = Accepted("a boolean", (bool,))
MONEY = Accepted("a number", (int, float, Decimal))  # made Decimal USD
LOG_ID = Accepted("a string or an ObjectId", (str, ObjectId))
STORABLE = (type(None), bool, int, float, Decimal, str, datetime, ObjectId)
INT64 = 2**63  # BSON's and SQLite's integers; SQLite keeps money as integer nano-USD

ACCEPTED: dict[schema.Kind, Accepted] = {
    "text": STRING,
    "int": NUMBER,
    "money": MONEY,
    "date": DATE,
    "bool": BOOLEAN,
}


def _accepted(collection: schema.Collection) -> dict[str, Accepted]:
    """What each field of the collection may hold (objects unchecked: burnmeter's own)."""
    return {f.name: ACCEPTED[f.kind] for f in collection.fields if f.kind in ACCEPTED}


USER_FIELDS = _accepted(schema.USER)
LOG_FIELDS = _accepted(schema.REQUEST_LOG) | {"_id": LOG_ID}  # the original's are ObjectIds


@dataclass(frozen=True, slots=True)
class Reject:
    line: int
    reason: str


@dataclass(slots=True)
class Report:
    collection: str
    added: int = 0
    skipped: int = 0
    rejects: list[Reject] = field(default_factory=list)
    expired: list[int] = field(default_factory=list)  # lines of logs older than the retention

    def count(self, outcome: ImportOutcome) -> None:
        if outcome == "skipped":
            self.skipped += 1
        else:
            self.added += 1

    def summary(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "added": self.added,
            "skipped": self.skipped,
            "expired": len(self.expired),
            "rejected": len(self.rejects),
        }


def user_fields(pools: Mapping[str, Pool]) -> dict[str, Accepted]:
    """The original's user fields (``docs/documents.md``) and those the configured pools name."""
    fields = dict(USER_FIELDS)
    for pool in pools.values():
        fields.update(dict.fromkeys((*pool.balance, pool.used), MONEY))
        if pool.tokens:
            fields[pool.tokens] = NUMBER
        if pool.expires:
            fields[pool.expires] = DATE
    return fields


def parse(line: str, fields: Mapping[str, Accepted]) -> Document:
    """One exported document, decoded and checked; ``BadLine`` says what is wrong."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"bad JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(raw, dict):
        raise BadLine(f"not a JSON object but {kind(raw)}")
    doc = {name: _decode(value, name) for name, value in raw.items()}
    if doc.get("_id") is None:
        raise BadLine("missing _id")
    for name, value in doc.items():
        expected = fields.get(name)
        if value is None or expected is None:
            continue
        if not expected.accepts(value):
            raise BadLine(f"{name}: expected {expected.name}, got {kind(value)}")
        if expected is MONEY:
            doc[name] = _exact_usd(value, name)
    return doc


def _decode(value: Any, where: str) -> Any:
    """Extended JSON wrappers to values; anything a store cannot keep is refused."""
    try:
        decoded = extjson.python(value)
    except ArithmeticError:
        raise BadLine(f"{where}: number out of range") from None
    except (TypeError, ValueError, BSONError) as e:
        if isinstance(value, dict) and list(value) == ["$date"]:
            raise BadLine(
                f"{where}: {{$date: {json.dumps(value['$date'])}}} is not a date"
                " (ISO 8601 with an offset, or epoch milliseconds, years 1-9999)"
            ) from None
        raise BadLine(f"{where}: bad Extended JSON: {e}") from None
    _check_storable(decoded, where)
    return decoded


def _check_storable(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for name, item in value.items():
            if name.startswith("$"):
                raise BadLine(f"{where}: unsupported Extended JSON {name}")
            _check_storable(item, f"{where}.{name}")
    elif isinstance(value, list):
        for item in value:
            _check_storable(item, where)
    elif not isinstance(value, STORABLE):
        raise BadLine(f"{where}: unsupported value ({type(value).__name__})")
    elif isinstance(value, int) and not -INT64 <= value < INT64:
        raise BadLine(f"{where}: {value} is out of range")
    elif isinstance(value, float) and not math.isfinite(value):
        raise BadLine(f"{where}: {value} is not a finite number")
    elif isinstance(value, Decimal) and not value.is_finite():
        raise BadLine(f"{where}: {value} is not a finite number")


def _exact_usd(value: Any, name: str) -> Decimal:
    try:
        amount = to_decimal(value)
    except ArithmeticError:
        amount = None
    if amount is None or abs(amount) * NANOS_PER_USD >= INT64:
        raise BadLine(f"{name}: {value} is out of range")
    return amount


def kind(value: Any) -> str:
    """A decoded value's type in words, for messages."""
    words = {bool: "a boolean", str: "a string", datetime: "a date", ObjectId: "an ObjectId"}
    words |= {type(None): "null", list: "an array", dict: "an object"}
    for python_type, word in words.items():
        if isinstance(value, python_type):
            return word
    return "a number" if isinstance(value, int | float | Decimal) else type(value).__name__


def import_users(lines: Iterable[bytes], store: Store, keep_after: datetime | None) -> Report:
    """Users, whatever their age (retention is about logs)."""
    fields = user_fields(store.pools)
    return _import("users", lines, lambda line: parse(line, fields), store.import_user)


def import_logs(lines: Iterable[bytes], store: Store, keep_after: datetime | None) -> Report:
    """Logs created before ``keep_after`` (the retention) are counted as expired, not added."""

    def expired(doc: Document) -> bool:
        created = doc.get("createdAt")
        return keep_after is not None and isinstance(created, datetime) and created < keep_after

    return _import("logs", lines, parse_log, store.import_log, expired)


def parse_log(line: str) -> Document:
    doc = parse(line, LOG_FIELDS)
    if isinstance(doc.get("userKeyId"), str) and "…" not in doc["userKeyId"]:
        doc["userKeyId"] = mask_key(
            doc["userKeyId"]
        )  # the original logged whole keys (docs/documents.md)
    return doc


def _import(
    collection: str,
    lines: Iterable[bytes],
    parse_line: Callable[[str], Document],
    put: Callable[[Document], ImportOutcome],
    expired: Callable[[Document], bool] = lambda doc: False,
) -> Report:
    report = Report(collection)
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")
        except UnicodeDecodeError as e:
            report.rejects.append(Reject(number, f"not UTF-8 (byte {e.start + 1})"))
            continue
        if not line.strip():
            continue
        try:
            doc = parse_line(line)
        except BadLine as e:
            report.rejects.append(Reject(number, str(e)))
            continue
        if expired(doc):
            report.expired.append(number)
            continue
        report.count(put(doc))
    return report


IMPORTERS = {"users": import_users, "logs": import_logs}


@click.command("import")
@click.argument("collection", metavar="users|logs", type=click.Choice(list(IMPORTERS)))
@click.argument("file", type=click.File("rb"))
@format_option
@click.pass_obj
def import_command(state: Context, collection: str, file: BinaryIO, fmt: str) -> None:
    """Import users (usersNew) or logs (request_logs) exported by mongoexport.

    FILE holds one JSON document per line, as `mongoexport --collection usersNew` (or
    request_logs) writes it, relaxed or canonical Extended JSON ($date, $oid, $numberLong,
    $numberInt, $numberDouble, $numberDecimal); `-` reads standard input. Dates, numbers,
    ObjectId _ids and missing fields are kept as they are; money becomes exact USD. The
    whole keys the original wrote into request_logs.userKeyId are masked (prefix + last 4;
    docs/documents.md).

    A document whose _id is already stored is skipped, so importing twice adds nothing.
    A line that is not a valid document (bad JSON, no _id, a known field of the wrong
    type) is rejected with its line number and reason, and nothing of it is written; the
    other lines are still imported. Table and CSV output print rejects on stderr; JSON
    lists them under "rejects".

    Request logs older than the config's log_ttl_days (30 by default) are not imported,
    since the proxy would delete them: they are counted as "expired" and their lines
    named. To import a history, set log_ttl_days = 0 (keep forever) in the config that the
    proxy uses too.

    Exit status: 0 when no line was rejected, 1 when some were; the summary is printed
    either way.
    """
    ttl = state.config.log_ttl_days
    keep_after = utcnow() - timedelta(days=ttl) if ttl else None
    report = IMPORTERS[collection](file, state.new_store, keep_after)
    if report.expired:
        click.echo(
            f"burnmeter: {_lines(report.expired)}: logs older than {ttl} days"
            f" (log_ttl_days of config {state.config_source.describe()}) not imported:"
            " the proxy would delete them; log_ttl_days = 0 keeps them",
            err=True,
        )
    if fmt == "json":
        rejects = [asdict(r) for r in report.rejects]
        summary = {**report.summary(), "expired_lines": report.expired, "rejects": rejects}
        click.echo(json.dumps(summary, indent=2))
    else:
        for reject in report.rejects:
            click.echo(f"burnmeter: line {reject.line}: {reject.reason}", err=True)
        emit_record(report.summary(), fmt)
    if report.rejects:
        raise click.exceptions.Exit(1)


def _lines(numbers: list[int]) -> str:
    """``line 4``, ``lines 1, 2, 3``, ``lines 1, 2, … (1,200 lines)``."""
    if len(numbers) == 1:
        return f"line {numbers[0]}"
    shown = ", ".join(str(n) for n in numbers[:SHOWN_LINES])
    more = f", … ({len(numbers):,} lines)" if len(numbers) > SHOWN_LINES else ""
    return f"lines {shown}{more}"
