"""Every exception the addon raises, in one place.

    Rejection (Exception)          a request answered locally: ``problem`` (status and code,
                                   ``addons/errors.py``), a message, headers, extra fields
    Ambiguous (ValueError)         a request refused by its reading (``addons/canonical.py``),
                                   before anything else is decided: ``problem`` in ``style``
    UsageMasked (ValueError)       a parameter that would make the upstream leave the usage out
    ConflictingKeys (ValueError)   two different client keys in one request
    DuplicateKey (ValueError)      a JSON object naming one key twice

The last three are findings of one check, which its caller turns into an ``Ambiguous`` or a
``Rejection`` answered in the API's error shape. Failures of the core (store, journal, config)
are ``burnmeter/exceptions.py``'s.
"""

from __future__ import annotations

from typing import Any

from addons import errors
from addons.errors import Problem
from addons.errors import Style


class Rejection(Exception):
    """A request answered locally with ``problem``; ``extra`` joins OpenAI's error object."""

    def __init__(
        self,
        problem: Problem,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.problem = problem
        self.message = message
        self.headers = headers or {}
        self.extra = extra


class Ambiguous(ValueError):
    """A request refused before anything else is decided: ``problem`` in ``style``."""

    def __init__(self, message: str, style: Style, problem: Problem = errors.AMBIGUOUS) -> None:
        super().__init__(message)
        self.style = style
        self.problem = problem


class UsageMasked(ValueError):
    """A parameter that would make the upstream leave the usage out of its answer."""


class ConflictingKeys(ValueError):
    """The request carries two different keys: which one pays would depend on the reader."""


class DuplicateKey(ValueError):
    """A JSON object naming one key twice: parsers disagree on which value wins."""
