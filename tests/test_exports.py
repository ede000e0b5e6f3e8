"""Exports stream every matching row and carry a manifest tied to the verified chain."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from ledger.cli import main
from ledger.settings import Settings
from ledger.simulation import Traffic
from tests.conftest import Database


async def _history(database: Database) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from ledger.web import create_app
    from tests.helpers import install_sample_portal
    from tests.test_projections import ingest

    settings = Settings(database_url=database.service_dsn, run_projector=False)
    async with TestClient(TestServer(create_app(settings))) as client:
        await install_sample_portal(client)
        await ingest(client, Traffic(seed=4, portals=3), 300)


def run(database: Database, *args: str) -> Any:
    env = {"LEDGER_DATABASE_URL": database.service_dsn, "LEDGER_LOG_LEVEL": "WARNING"}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_event_export_matches_the_store_and_the_verified_head(
    database: Database, tmp_path: Path
) -> None:
    asyncio.run(_history(database))
    out = tmp_path / "events.jsonl"
    assert run(database, "export", "events", "--output", str(out)).exit_code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    manifest = json.loads((tmp_path / "events.jsonl.manifest.json").read_text())
    assert [e["position"] for e in lines] == list(range(1, manifest["head_position"] + 1))
    assert manifest["rows"] == len(lines)
    verified = run(database, "verify", "--quiet").output
    assert f"head {manifest['head_position']} {manifest['head_hash']}" in verified
    assert all("access_token" not in json.dumps(e["payload"]) for e in lines)


def test_filtered_csv_exports_and_bots(database: Database, tmp_path: Path) -> None:
    asyncio.run(_history(database))
    out = tmp_path / "deletes.csv"
    result = run(database, "export", "events", "--format", "csv", "--type", "ONIMBOTDELETE",
                 "--output", str(out))
    assert result.exit_code == 0, result.output
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    assert {r["event_type"] for r in rows} == {"ONIMBOTDELETE"}
    manifest = json.loads((tmp_path / "deletes.csv.manifest.json").read_text())
    assert manifest["filters"] == {"event_type": "ONIMBOTDELETE"}
    bots = run(database, "export", "bots", "--format", "jsonl").output.splitlines()
    assert bots
    assert {"portal_member_id", "bot_id", "status"} <= set(json.loads(bots[0]))


def test_verification_runs_are_recorded_for_the_api(database: Database) -> None:
    asyncio.run(_history(database))
    assert run(database, "verify", "--quiet").exit_code == 0
    events = json.loads(run(database, "events", "--limit", "1", "--json").output.splitlines()[0])
    assert events["position"] == 1

    async def status() -> list[Any]:
        from ledger.storage.audit_store import AuditStore
        from ledger.storage.store import create_pool

        pool = await create_pool(database.service_dsn, size=2)
        try:
            return await AuditStore(pool).verification_status()
        finally:
            await pool.close()

    rows = asyncio.run(status())
    assert {(r["stream"], r["ok"]) for r in rows} == {("events", True), ("rejections", True)}


def test_a_paged_listings_manifest_records_the_checkpoint_its_pages_were_read_at(
    database: Database, tmp_path: Path, monkeypatch: Any,
) -> None:
    """`ledger export bots|deletions` reads its pages in one snapshot; the manifest used to
    record the chain's head read after the last page — past what the rows are a fold of when
    the projector committed during the export. It records the snapshot's checkpoint now."""
    from ledger.cli.common import opened_audit
    from ledger.projections import readers
    from ledger.storage.projection_store import ProjectionSnapshot
    from tests.test_projections import ingest

    asyncio.run(_history(database))
    settings = Settings(database_url=database.service_dsn, run_projector=False)
    traffic = Traffic(seed=4, portals=3)  # continuing `_history`'s deliveries
    for _ in range(300):
        traffic.next()

    async def advance() -> tuple[int, bytes]:
        """More events, folded: the projector's commit, from another process's point of view."""
        from aiohttp.test_utils import TestClient, TestServer

        from ledger.web import create_app

        async with TestClient(TestServer(create_app(settings))) as client:
            await ingest(client, traffic, 20)
        async with opened_audit(settings) as opened:
            await opened.audit.bots()  # catches the registry up
            return await opened.store.head()

    async def folded() -> tuple[int, bytes]:
        async with opened_audit(settings) as opened:
            await opened.audit.bots()
            checkpoint = await opened.audit.projection()
            return checkpoint.position, bytes.fromhex(checkpoint.head_hash)

    monkeypatch.setattr(readers, "PAGE", 1)
    heads: list[tuple[int, bytes]] = []
    for method in ("page", "deletion_page"):
        original = getattr(ProjectionSnapshot, method)

        async def paged(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            found = await _original(self, *args, **kwargs)
            if len(heads) < pages_before_commit:  # once, after the first page
                heads.append(await asyncio.to_thread(asyncio.run, advance()))
            return found

        monkeypatch.setattr(ProjectionSnapshot, method, paged)
    for kind in ("bots", "deletions"):
        before = asyncio.run(folded())
        pages_before_commit = len(heads) + 1
        out = tmp_path / f"{kind}.jsonl"
        result = run(database, "export", kind, "--format", "jsonl", "--output", str(out))
        assert result.exit_code == 0, result.output
        assert len(out.read_text().splitlines()) >= 2  # more than one page
        manifest = json.loads((tmp_path / f"{kind}.jsonl.manifest.json").read_text())
        assert heads[-1][0] > before[0]  # the projector committed during the export
        assert (manifest["head_position"], manifest["head_hash"]) == (before[0], before[1].hex())
        assert manifest["head_is"] == "projection_checkpoint"
    events = tmp_path / "events.jsonl"
    assert run(database, "export", "events", "--output", str(events)).exit_code == 0
    assert json.loads((tmp_path / "events.jsonl.manifest.json").read_text())["head_is"] \
        == "chain_head"


def test_a_filter_on_bot_zero_is_in_the_manifest(database: Database, tmp_path: Path) -> None:
    """`--bot 0` filters the rows, so the manifest must say so: a manifest that drops it
    claims an unfiltered export of rows that are not all the events."""
    out = tmp_path / "bot0.jsonl"
    result = run(database, "export", "events", "--bot", "0", "--output", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "bot0.jsonl.manifest.json").read_text())
    assert manifest["filters"] == {"bot_id": 0}
