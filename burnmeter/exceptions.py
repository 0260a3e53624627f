"""Every exception burnmeter's core raises, in one place.

    BurnmeterError
    ├── ConfigError (ValueError)        a config problem, as one line naming the key
    │   └── AlertConfigError            an [[alerts]] rule whose webhook cannot be used
    ├── PeriodError (ValueError)        a bad period, zone or time (``source``: which input)
    ├── PriceError (ValueError)         a price that cannot be built or computed
    ├── UnknownModelError (ValueError)  no price for a model under the config's policy (400)
    ├── MissingListPrice (LookupError)  genai-prices no longer prices a built-in model
    ├── StoreURLError (ValueError)      a store URL burnmeter cannot open
    ├── StoreError (RuntimeError)       the store cannot be reached or is not answering
    │   └── StoreMissing                no store where the URL points
    ├── UserExists (ValueError)         ``create_user`` for a user id that is taken
    ├── DocumentError (ValueError)      the store cannot apply an operation to one document
    └── JournalError (RuntimeError)     the journal cannot be written (or fsynced)
        ├── JournalFull                 it reached its size limit
        └── JournalLocked               another process has it open

The ``ValueError`` ones are the caller's mistake, found where it is made, and their message is
one line for a CLI user or an operator; the ``RuntimeError`` ones are outages, waited out or
answered 503. The proxy's own (requests answered locally) are in ``addons/exceptions.py``, the
CLI's in ``stats/exceptions.py``.
"""

from __future__ import annotations


class BurnmeterError(Exception):
    """Anything burnmeter's core refuses or cannot do."""


class ConfigError(BurnmeterError, ValueError):
    """A config problem, as one line naming the key."""


class AlertConfigError(ConfigError):
    """A rule whose webhook cannot be used, as one line naming the key."""


class PeriodError(BurnmeterError, ValueError):
    """A bad period, zone or time, as one line; ``source`` names the input at fault
    (``tz``, ``now``, ``since``, ``until``), None for a bad combination."""

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.source = source


class PriceError(BurnmeterError, ValueError):
    """A price that cannot be built or computed; the message names the problem."""


class UnknownModelError(BurnmeterError, ValueError):
    """No price for the model under the config's policy: the request is refused (400)."""


class MissingListPrice(BurnmeterError, LookupError):
    """genai-prices no longer prices a built-in model, or prices it at 0."""


class StoreURLError(BurnmeterError, ValueError):
    """A store URL that names no store burnmeter can open (``sqlite:///FILE``,
    ``mongodb://HOST/DB``)."""


class StoreError(BurnmeterError, RuntimeError):
    """The store cannot be reached or is not answering (an outage, not a user error)."""


class StoreMissing(StoreError):
    """There is no store where the URL points (opened without creating it)."""


class UserExists(BurnmeterError, ValueError):
    """``create_user`` for a user id that is taken."""


class DocumentError(BurnmeterError, ValueError):
    """The store answered, but cannot apply an operation to one document (e.g. a legacy
    field holding a string): not an outage, and retrying will not help."""


class JournalError(BurnmeterError, RuntimeError):
    """The journal cannot take a record (a full disk, an I/O error, a failed fsync)."""


class JournalFull(JournalError):
    """The journal reached ``max_bytes``: the store has been unreachable for too long."""


class JournalLocked(JournalError):
    """Another process (or another ``Journal`` in this one) has the journal open."""
