"""One vocabulary: every column of the audit views says what it means."""

from __future__ import annotations

import asyncio
import csv
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from click.testing import CliRunner

from ledger.cli import main
from ledger.exports import utc
from ledger.settings import Settings
from tests.conftest import MEMBER_ID, Database, sample
from tests.test_console import DELETED_AT

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


# ---- one vocabulary across the views, the read API, the CSV exports and the CLI ------------

# the API's own derived field (a list of names) where the view has one boolean per anomaly
API_ONLY = {"anomalies"}
# names the API, CSV and CLI used before (pre-1.0) for concepts the views name otherwise
OLD_NAMES = {"occurred_at", "actor_user_id", "deleted_by", "member_id", "domain", "hash"}


async def _answers(settings: Settings) -> dict[str, Any]:
    """The samples (bot 567 deleted by user 27) through a served app, then what the API and the
    views say about them."""
    from aiohttp.test_utils import TestClient, TestServer

    from ledger.web import create_app
    from tests.helpers import PROJECTOR, install_sample_portal, post, with_projector
    from tests.test_api import bearer

    async with TestClient(TestServer(with_projector(create_app(settings)))) as client:
        await install_sample_portal(client)
        for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
            assert (await post(client, sample(name)))[0] == 200
        assert client.app is not None
        await client.app[PROJECTOR].catch_up()
        headers = await bearer(client)
        bodies = {}
        for path in ["/bots", "/deletions", "/events?payload=true", "/portals", "/rejections",
                     f"/portals/{MEMBER_ID}/bots/567", "/verification", "/projection"]:
            response = await client.get(f"/api/v1{path}", headers=headers)
            assert response.status == 200, path
            bodies[path] = await response.text()
    assert settings.admin_database_url is not None
    admin = await asyncpg.connect(settings.admin_database_url.get_secret_value())
    try:
        columns = {view: [r["column_name"] for r in await admin.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'audit' "
            "AND table_name = $1 ORDER BY ordinal_position", view)] for view in VIEWS}
        deletion = await admin.fetchrow(
            "SELECT deleted_at, received_at, deleted_by_user_id FROM audit.deletions "
            "WHERE bot_id = 567")
    finally:
        await admin.close()
    return {"bodies": bodies, "columns": columns, "deletion": deletion}


def _cli(database: Database, *args: str) -> str:
    env = {"LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_ADMIN_DATABASE_URL": database.admin_dsn, "LEDGER_LOG_LEVEL": "WARNING"}
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_deletions_and_bots_have_the_views_names_in_the_api_the_csv_and_the_cli(
    database: Database, settings: Settings, tmp_path: Path,
) -> None:
    found = asyncio.run(_answers(settings))
    columns, bodies = found["columns"], found["bodies"]
    for kind, view in [("deletions", "deletions"), ("bots", "bots")]:
        api_fields = list(orjson.loads(bodies[f"/{kind}"])[0])
        out = tmp_path / f"{kind}.csv"
        _cli(database, "export", kind, "--format", "csv", "--output", str(out))
        with out.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header, rows = list(reader.fieldnames or []), list(reader)
        cli_fields = list(orjson.loads(_cli(database, kind, "--json").splitlines()[0]))
        # the same names for the same concepts: every field is a column of the view, by name
        assert set(api_fields) - API_ONLY <= set(columns[view]), kind
        assert header == api_fields, kind  # and the CSV says it the same way, in the same order
        assert set(cli_fields) == set(api_fields), kind
        assert not OLD_NAMES & (set(api_fields) | set(header) | set(cli_fields)), kind
        table_header = _cli(database, kind).splitlines()[0].lower().split()
        assert set(table_header) <= set(api_fields), kind
        assert "[]" not in {cell for row in rows for cell in row.values()}, kind
    for concept in ["deleted_at", "deleted_by_user_id", "portal_member_id", "bot_id"]:
        assert concept in columns["deletions"]
        assert concept in columns["bots"]

    # deleted_at is Bitrix24's time, received_at the ledger's, in the view and the API alike
    (deletion,) = [d for d in orjson.loads(bodies["/deletions"]) if d["bot_id"] == 567]
    view = found["deletion"]
    assert deletion["deleted_at"] == DELETED_AT == utc(view["deleted_at"]).replace(".000000", "")
    assert deletion["received_at"] == utc(view["received_at"]) != deletion["deleted_at"]
    assert deletion["deleted_by_user_id"] == view["deleted_by_user_id"] == "27"
    (bot,) = [b for b in orjson.loads(bodies["/bots"]) if b["bot_id"] == 567]
    assert bot["deleted_at"] == DELETED_AT
    assert bot["deleted_by_user_id"] == "27"

    # one time format: ISO 8601 UTC with a Z, never +00:00, wherever a time is written
    events = tmp_path / "events.csv"
    _cli(database, "export", "events", "--format", "csv", "--output", str(events))
    jsonl = tmp_path / "events.jsonl"
    _cli(database, "export", "events", "--output", str(jsonl))
    header = events.read_text().splitlines()[0].split(",")
    assert header[:4] == ["event_type", "bot_ids", "occurred_at", "received_at"]  # human order
    assert header[-3:] == ["position", "event_hash", "payload"]
    outputs = {**bodies, "events.csv": events.read_text(), "events.jsonl": jsonl.read_text()}
    for args in [("bots",), ("bots", "--json"), ("deletions",), ("deletions", "--json"),
                 ("events",), ("events", "--json"), ("rejections",), ("portals", "list"),
                 ("portals", "list", "--json")]:
        outputs[" ".join(args)] = _cli(database, *args)
    for name, text in outputs.items():
        assert "+00:00" not in text, name
    assert DELETED_AT in outputs["deletions"]  # the CLI table, to the second


def test_the_docs_query_bot_ids_in_their_indexable_form() -> None:
    root = Path(__file__).parent.parent
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "= ANY (" not in text.replace("ANY(", "ANY ("), doc.name
    assert "bot_ids @> '{567}'" in (root / "docs" / "auditors.md").read_text()
