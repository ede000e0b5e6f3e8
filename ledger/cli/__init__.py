"""The `ledger` command: one group (`app.main`), its subcommands registered by module."""

from ledger.cli import forensics, integrity, service, tools, trust  # noqa: F401 - registration
from ledger.cli.app import main

__all__ = ["main"]
