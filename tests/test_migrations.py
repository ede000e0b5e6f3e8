"""Migrations go up, down and up again on a fresh database, and leave the guards in place."""

from __future__ import annotations

import asyncio

import asyncpg

from ledger import migrations
from tests.conftest import Database

GUARDS = {
    "events_no_update_delete", "events_no_truncate",
    "rejections_no_update_delete", "rejections_no_truncate",
    "redeliveries_no_update_delete", "redeliveries_no_truncate",
    "verifications_no_update_delete", "verifications_no_truncate",
    # trust state follows from trust events only (0005)
    "events_apply_trust", "portal_trust_no_delete", "portal_trust_no_truncate",
    "portal_allowances_no_delete", "portal_allowances_no_truncate",
    "forward_attempts_no_update_delete", "forward_attempts_no_truncate",
    "tree_nodes_no_update_delete", "tree_nodes_no_truncate",
    "tree_checkpoints_no_update_delete", "tree_checkpoints_no_truncate",
}


async def _triggers(dsn: str) -> set[str]:
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'ledger' AND NOT t.tgisinternal"
        )
    finally:
        await connection.close()
    return {r["tgname"] for r in rows}


async def test_upgrade_downgrade_upgrade_leaves_the_append_only_guards(
    empty_database: Database,
) -> None:
    dsn = empty_database.admin_dsn
    await asyncio.to_thread(migrations.upgrade, dsn)
    assert await _triggers(dsn) == GUARDS
    await asyncio.to_thread(migrations.downgrade, dsn)
    assert await _triggers(dsn) == set()
    await asyncio.to_thread(migrations.upgrade, dsn)
    assert await _triggers(dsn) == GUARDS


async def test_the_store_belongs_to_another_role_than_the_service(database: Database) -> None:
    connection = await asyncpg.connect(database.admin_dsn)
    try:
        owner = await connection.fetchval(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'ledger' AND tablename = 'events'"
        )
        rights = await connection.fetchval(
            "SELECT array_agg(privilege_type ORDER BY privilege_type) "
            "FROM information_schema.role_table_grants "
            "WHERE grantee = 'ledger_app' AND table_schema = 'ledger' AND table_name = 'events'"
        )
    finally:
        await connection.close()
    assert owner == "ledger_owner"
    assert rights == ["INSERT", "SELECT"]
