"""Schema migrations, run through alembic with the DSN ledger already resolved.

Alembic's env runs its own event loop, so from async code call these through `asyncio.to_thread`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"


def alembic_config(dsn: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCHEMA_DIR))
    config.attributes["dsn"] = dsn
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    assert head is not None, "schema/versions holds no revision"
    return head


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)
