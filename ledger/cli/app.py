"""The `ledger` command group; its subcommands live beside it (service, trust, integrity,
forensics, tools) and share `ledger.cli.common`."""

from __future__ import annotations

import logging
import sys

import click
from pydantic import ValidationError

from ledger.settings import Settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ledger")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Audit ledger for Bitrix24 chatbot events.

    Configuration comes from LEDGER_* environment variables (see README). Without
    LEDGER_DATABASE_URL, an embedded PostgreSQL is started in LEDGER_DATA_DIR (./.ledger).
    """
    try:
        ctx.obj = Settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid LEDGER_* setting: {exc}") from exc
    logging.basicConfig(
        level=ctx.obj.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
