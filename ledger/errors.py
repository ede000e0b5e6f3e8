"""One exception root for everything the ledger raises on purpose.

Each subclass carries the data an operator or a client needs; HTTP statuses are assigned in one
place (`ledger.web`), never by the code that raises.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Root of every deliberate ledger failure."""


class ConfigurationError(LedgerError):
    """The settings or the environment cannot work; the message says what to set or install."""


class DatabaseUnavailable(LedgerError):
    """PostgreSQL could not be reached or answered with a connection-level failure."""


class SchemaNotMigrated(LedgerError):
    """The database schema is missing or behind the code's migrations."""

    def __init__(self, current: str | None, expected: str) -> None:
        self.current = current
        self.expected = expected
        super().__init__(
            f"database schema is at revision {current or 'none'}, the code needs {expected}: "
            "run `ledger migrate` (with an admin DSN in LEDGER_ADMIN_DATABASE_URL) first"
        )


class DeliveryRejected(LedgerError):
    """A delivery that will not be stored as an event.

    `code` is a stable machine-readable reason (it is what the rejection log and metrics record);
    `status` the HTTP status the sender gets.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


class AppendFailed(LedgerError):
    """PostgreSQL refused a batch for a reason other than availability (a data error).

    The group committer retries the batch's items one by one, so one bad item fails alone.
    """
