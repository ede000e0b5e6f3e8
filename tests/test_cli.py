"""The `ledger` command as an operator uses it."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner

from ledger.cli import main
from ledger.errors import SchemaNotMigrated
from ledger.settings import Settings
from ledger.web import create_app
from tests.conftest import DOMAIN, MEMBER_ID, TOKEN, Database


def run(database: Database, *args: str) -> Any:
    env = {"LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_ADMIN_DATABASE_URL": database.admin_dsn, "LEDGER_LOG_LEVEL": "WARNING"}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_allow_trust_revoke_and_list_portals(database: Database, tmp_path: Path) -> None:
    assert run(database, "portals", "allow", "--domain", DOMAIN).exit_code == 0
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = run(database, "portals", "trust", "--member-id", MEMBER_ID, "--domain", DOMAIN,
                 "--token-file", str(token_file))
    assert result.exit_code == 0, result.output
    listed = [orjson.loads(line) for line in
              run(database, "portals", "list", "--json").output.splitlines()]
    assert [(p["member_id"], p["state"], p["allowed"]) for p in listed] == [
        (MEMBER_ID, "trusted", True)
    ]
    assert TOKEN not in run(database, "portals", "list").output
    assert run(database, "portals", "revoke", "--member-id", MEMBER_ID).exit_code == 0
    listed = [orjson.loads(line) for line in
              run(database, "portals", "list", "--json").output.splitlines()]
    assert listed[0]["state"] == "ended"


def test_portals_allow_wants_exactly_one_target(database: Database) -> None:
    result = run(database, "portals", "allow")
    assert result.exit_code == 2
    assert "exactly one" in result.output


def test_db_url_prints_the_services_restricted_dsn(database: Database) -> None:
    assert run(database, "db", "url").output.strip() == database.service_dsn
    assert run(database, "db", "url", "--admin").output.strip() == database.admin_dsn


async def test_serve_refuses_an_unmigrated_external_database(
    empty_database: Database,
) -> None:
    from aiohttp.test_utils import TestServer

    server = TestServer(create_app(Settings(database_url=empty_database.admin_dsn)))
    with pytest.raises(SchemaNotMigrated, match="ledger migrate"):
        await server.start_server()
    await server.close()


def test_migrate_makes_an_external_database_servable(empty_database: Database) -> None:
    result = run(empty_database, "migrate")
    assert result.exit_code == 0, result.output
    assert run(empty_database, "portals", "allow", "--domain", DOMAIN).exit_code == 0


def test_errors_are_one_line_and_non_zero(tmp_path: Path) -> None:
    env = {"LEDGER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    result = CliRunner().invoke(main, ["portals", "list"], env=env)
    assert result.exit_code == 1
    assert result.output.startswith("Error: cannot connect to PostgreSQL")
    assert "Traceback" not in result.output


def test_embedded_database_is_started_migrated_and_kept(tmp_path: Path) -> None:
    env = {"LEDGER_DATA_DIR": str(tmp_path / "ledger"), "LEDGER_LOG_LEVEL": "WARNING"}
    runner = CliRunner()
    try:
        assert runner.invoke(main, ["portals", "allow", "--domain", DOMAIN], env=env).exit_code == 0
        dsn = runner.invoke(main, ["db", "url"], env=env).output.strip()
        assert "ledger_app@" in dsn

        async def count() -> int:
            connection = await asyncpg.connect(dsn)
            try:
                return int(await connection.fetchval("SELECT count(*) FROM ledger.events"))
            finally:
                await connection.close()

        assert asyncio.run(count()) == 1  # the data survived the first command's exit
    finally:
        assert runner.invoke(main, ["db", "stop"], env=env).exit_code == 0


def test_embedded_server_is_stopped_though_a_user_of_it_died_without_letting_go(
    tmp_path: Path,
) -> None:
    """Found by the lead: pgserver stops the server when its last registered user lets go; a
    process killed with -9 never did, and the server then outlived every later run."""
    env = {"LEDGER_DATA_DIR": str(tmp_path / "data"), "LEDGER_LOG_LEVEL": "WARNING"}
    pgdata = tmp_path / "data" / "pgdata"
    runner = CliRunner()
    try:
        assert runner.invoke(main, ["db", "url"], env=env).exit_code == 0  # started, kept
        users = pgdata / ".handle_pids.json"
        dead = subprocess.Popen(["true"])  # a pid that is certainly gone
        dead.wait()
        users.write_text(json.dumps([*json.loads(users.read_text()), dead.pid]))
        postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    finally:
        assert runner.invoke(main, ["db", "stop"], env=env).exit_code == 0
    assert not (pgdata / "postmaster.pid").exists()
    status = Path(f"/proc/{postmaster}/status")
    assert not status.exists() or "State:\tZ" in status.read_text()  # gone (or a zombie)


async def _deliver_samples(database: Database) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from ledger.web import create_app as make_app
    from tests.conftest import sample
    from tests.helpers import install_sample_portal, post

    settings = Settings(database_url=database.service_dsn, run_projector=False)
    async with TestClient(TestServer(make_app(settings))) as client:
        await install_sample_portal(client)
        for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
            assert (await post(client, sample(name)))[0] == 200


def test_bots_and_deletions_answer_in_json_with_snake_case_fields(database: Database) -> None:
    asyncio.run(_deliver_samples(database))
    assert "applied" in run(database, "project", "--once").output
    bots = [orjson.loads(x) for x in run(database, "bots", "--json").output.splitlines()]
    assert {(b["portal_member_id"], b["bot_id"], b["bot_code"], b["status"]) for b in bots} == {
        (MEMBER_ID, 567, "BOT", "deleted"), (MEMBER_ID, 571, "BOT", "active"),  # latest code
    }
    (deletion,) = [orjson.loads(x) for x in
                   run(database, "deletions", "--portal", MEMBER_ID, "--json").output.splitlines()]
    assert (deletion["bot_id"], deletion["cause"], deletion["deleted_by_user_id"]) == (
        567, "bot deleted", "27")
    assert isinstance(deletion["position"], int)
    before = run(database, "bots", "--as-of", str(deletion["position"] - 1), "--json").output
    assert {orjson.loads(x)["status"] for x in before.splitlines()} == {"active"}
    table = run(database, "bots", "--status", "deleted").output
    assert "567" in table
    assert "571" not in table
    rebuilt = run(database, "rebuild", "--quiet")
    assert rebuilt.exit_code == 0
    assert "rebuilt up to position" in rebuilt.output
    assert run(database, "bots", "--as-of", "not-a-time").exit_code == 1
