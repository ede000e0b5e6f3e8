"""The `ledger` command: one group (`app.main`), its subcommands registered by module."""

from ledger.cli import (  # noqa: F401 - registration
    forensics,
    forwarding,
    integrity,
    proofs,
    report,
    routes,
    service,
    tools,
    trust,
)
from ledger.cli.app import main

__all__ = ["main"]
