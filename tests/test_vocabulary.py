"""One vocabulary: every column of the audit views says what it means."""

from __future__ import annotations

from typing import Any

import asyncpg

VIEWS = ("events", "bots", "deletions", "portals", "portal_lifecycle", "anomalies", "rejections")


async def test_every_column_of_the_audit_views_has_a_comment(
    admin: asyncpg.Connection[Any],
) -> None:
    rows = await admin.fetch(
        """
        SELECT c.relname AS view, a.attname AS column, col_description(c.oid, a.attnum) AS note
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        WHERE n.nspname = 'audit' AND c.relkind = 'v' AND c.relname = ANY($1::text[])
        """,
        list(VIEWS),
    )
    assert {r["view"] for r in rows} == set(VIEWS)
    missing = [f"audit.{r['view']}.{r['column']}" for r in rows if not r["note"]]
    assert missing == []
    deleted_at = next(r["note"] for r in rows
                      if (r["view"], r["column"]) == ("deletions", "deleted_at"))
    assert deleted_at.startswith("Bitrix24 time")
