"""Schema migrations, run through alembic with the DSN ledger already resolved.

Alembic's env runs its own event loop, so from async code call these through `asyncio.to_thread`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

# The one source of truth for the schema: alembic's script directory, shipped inside the package
# (package data in pyproject.toml), so an installed wheel migrates exactly like a checkout.
SCHEMA_DIR = Path(__file__).resolve().parent / "schema"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCHEMA_DIR))
    config.attributes["dsn"] = dsn
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "ledger/schema/versions holds no revision"
    return head


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)


def execute_script(sql: str) -> None:
    """Run a multi-statement SQL script inside the current migration's transaction.

    `op.execute` goes through SQLAlchemy's asyncpg adapter, which prepares each statement and so
    accepts only one; a script needs asyncpg's simple-query path on the same connection.
    """
    from alembic import op

    dbapi_connection: Any = op.get_bind().connection.dbapi_connection
    dbapi_connection.run_async(lambda driver: driver.execute(sql))
