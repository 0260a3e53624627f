"""Every exception the CLI and the admin server raise, in one place.

    UserError (click.ClickException)  a mistake in what the user asked for or set up, found
                                      where it is made: one line on stderr, exit status 1
    BadLine (ValueError)              ``burnmeter import``: a line that is not a document of
                                      the collection (the import names it and goes on)
    BadQuery (Exception)              ``burnmeter serve``: a query parameter the reports
                                      cannot take, answered 400 with ``body``

The core's own (``burnmeter/exceptions.py``) reach a user as a ``UserError`` with their
one-line message.
"""

from __future__ import annotations

from typing import IO
from typing import Any

import click


class UserError(click.ClickException):
    """A mistake in what the user asked for or set up, found where it is made: one line
    on stderr, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"burnmeter: error: {self.format_message()}", err=True, file=file)


class BadLine(ValueError):
    """A line that is not a document of the collection; the message is one line."""


class BadQuery(Exception):
    """A query parameter the reports cannot take: answered 400 with ``body``."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"])
        self.body = body
