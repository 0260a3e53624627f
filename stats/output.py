"""Printing data as a table (people), JSON or CSV (machines)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import click
from bson import ObjectId

from burnmeter.money import is_number

FORMATS = ("table", "json", "csv")

format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="table",
    show_default=True,
    help="Output format: an aligned table for people, JSON or CSV for machines.",
)


def plain(value: Any) -> Any:
    """JSON-ready: Decimal as a number, datetime as ISO 8601 with offset, ObjectId as hex."""
    if isinstance(value, Decimal):
        return (
            int(value)
            if value == value.to_integral_value() and abs(value) < 2**53
            else float(value)
        )
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, ObjectId):  # the original's request log ids (docs/documents.md)
        return str(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):  # money: exact, as stored (nano-USD), no trailing zeros
        return f"{value.normalize():f}" if value else "0"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def exact(value: Any) -> str:
    """A CSV field: as in a table, but a float whole (``repr``), not to 4 digits."""
    return repr(value) if isinstance(value, float) else cell(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    grid = [list(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    numeric = [all(is_number(row.get(c)) for row in rows) and rows for c in columns]
    lines = []
    for n, r in enumerate(grid):
        parts = [
            v.rjust(w) if numeric[i] else v.ljust(w)
            for i, (v, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def emit_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str) -> None:
    """A list of records in the chosen format."""
    if fmt == "json":
        click.echo(json.dumps([plain(dict(r)) for r in rows], indent=2, ensure_ascii=False))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        for r in rows:
            writer.writerow({c: exact(r.get(c)) for c in columns})
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(table(rows, columns) if rows else "(no rows)")


def emit_record(record: Mapping[str, Any], fmt: str) -> None:
    """One record: JSON object, a one-row CSV, or a two-column table."""
    if fmt == "json":
        click.echo(json.dumps(plain(dict(record)), indent=2, ensure_ascii=False))
    elif fmt == "csv":
        emit_rows([record], list(record), fmt)
    else:
        width = max((len(k) for k in record), default=0)
        for k, v in record.items():
            shown = (
                json.dumps(plain(v), ensure_ascii=False)
                if isinstance(v, Mapping | list)
                else cell(v)
            )
            click.echo(f"{k.ljust(width)}  {shown}")
