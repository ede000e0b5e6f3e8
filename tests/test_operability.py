"""The CLI as an operator meets it: one line per failure, nothing on stderr on success, inputs
checked at the door, refusals visible to auditors, and metrics that add up across workers."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from click.testing import CliRunner, Result

from ledger.cli import main
from ledger.settings import Settings
from tests.conftest import DOMAIN, FORM, MEMBER_ID, TOKEN, Cluster, Database, sample
from tests.helpers import Client, install_sample_portal, post
from tests.servers import free_port, serving
from tests.test_api import bearer, get


def cli(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def service_env(database: Database) -> dict[str, str]:
    return {"LEDGER_DATABASE_URL": database.service_dsn,
            "LEDGER_ADMIN_DATABASE_URL": database.admin_dsn}


def one_line_failure(result: Result, *fragments: str) -> str:
    """Exit 1, one line, no traceback, and the line says what it must."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---- one line per error -------------------------------------------------------------------


def test_migrate_as_the_service_role_says_to_use_the_admin_dsn(
    empty_database: Database,
) -> None:
    result = cli({"LEDGER_DATABASE_URL": empty_database.service_dsn}, "migrate")
    one_line_failure(result, "permission denied", "LEDGER_ADMIN_DATABASE_URL")


def test_create_reader_without_admin_rights_is_one_line(database: Database) -> None:
    env = {"LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_ADMIN_DATABASE_URL": database.service_dsn}
    result = cli(env, "roles", "create-reader", "auditor")
    one_line_failure(result, "permission denied", "LEDGER_ADMIN_DATABASE_URL")


def test_an_unmigrated_schema_says_run_migrate(empty_database: Database) -> None:
    result = cli({"LEDGER_DATABASE_URL": empty_database.service_dsn}, "portals", "list")
    one_line_failure(result, "ledger migrate")


def test_an_unreachable_database_is_one_line_and_debug_shows_the_traceback() -> None:
    env = {"LEDGER_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"}
    one_line_failure(cli(env, "bots"), "PostgreSQL")
    debug = CliRunner().invoke(main, ["--debug", "bots"], env=env)
    assert debug.exit_code != 0
    assert debug.exception is not None  # raised, so Python prints the traceback


async def test_serve_on_a_busy_port_is_one_line(database: Database) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await asyncio.to_thread(
            cli, service_env(database), "serve", "--port", str(port)
        )
        one_line_failure(result, f"port {port}", "in use", "--port")
        result = await asyncio.to_thread(
            cli, service_env(database), "serve", "--port", str(port), "--workers", "2"
        )
        one_line_failure(result, f"port {port}", "in use")


async def test_serve_on_an_unmigrated_external_database_is_one_line(
    empty_database: Database, tmp_path: Path
) -> None:
    env = {**os.environ, "LEDGER_DATABASE_URL": empty_database.service_dsn,
           "LEDGER_DATA_DIR": str(tmp_path)}
    for workers in ("1", "2"):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "ledger", "serve", "--port", str(free_port()),
             "--workers", workers],
            env=env, capture_output=True, timeout=60, check=False,
        )
        assert done.returncode == 1
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "ledger migrate" in lines[0]


def test_a_setting_that_does_not_parse_is_one_line() -> None:
    one_line_failure(cli({"LEDGER_PORT": "eighty"}, "bots"), "LEDGER_PORT")


# ---- an external database, honestly --------------------------------------------------------


def test_admin_url_alone_migrates_that_database_never_an_embedded_one(
    empty_database: Database, tmp_path: Path
) -> None:
    env = {"LEDGER_ADMIN_DATABASE_URL": empty_database.admin_dsn,
           "LEDGER_DATA_DIR": str(tmp_path / "embedded")}
    result = cli(env, "migrate")
    assert result.exit_code == 0, result.output
    assert "external database" in result.output
    assert not (tmp_path / "embedded").exists()

    async def revision() -> str:
        connection = await asyncpg.connect(empty_database.admin_dsn)
        try:
            return str(await connection.fetchval("SELECT version_num FROM alembic_version"))
        finally:
            await connection.close()

    assert asyncio.run(revision())
    # every other command wants the service's DSN rather than falling back
    one_line_failure(cli(env, "portals", "list"), "LEDGER_DATABASE_URL")
    assert not (tmp_path / "embedded").exists()


async def test_a_missing_database_is_named_or_created_on_request(cluster: Cluster) -> None:
    name = f"ledger_created_{os.getpid()}"
    env = {"LEDGER_ADMIN_DATABASE_URL": cluster.dsn(name)}
    try:
        refused = await asyncio.to_thread(cli, env, "migrate")
        one_line_failure(refused, f'"{name}"', "--create-database", "CREATE DATABASE")
        created = await asyncio.to_thread(cli, env, "migrate", "--create-database")
        assert created.exit_code == 0, created.output
        again = await asyncio.to_thread(cli, env, "migrate", "--create-database")
        assert again.exit_code == 0, again.output
    finally:
        connection = await asyncpg.connect(cluster.admin_dsn)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


def test_success_prints_nothing_on_stderr_and_chatter_goes_to_the_log(tmp_path: Path) -> None:
    """A real process on the embedded database: pgserver's and alembic's INFO lines stay out."""
    env = {**os.environ, "LEDGER_DATA_DIR": str(tmp_path / "data")}
    env.pop("LEDGER_LOG_LEVEL", None)
    for args in (["migrate"], ["portals", "allow", "--domain", DOMAIN], ["bots"]):
        done = subprocess.run(
            [sys.executable, "-m", "ledger", *args], env=env, cwd=tmp_path,
            capture_output=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b"", done.stderr.decode()
    assert (tmp_path / "data" / "embedded.log").stat().st_size > 0


# ---- inputs checked at the door ------------------------------------------------------------


@pytest.mark.parametrize("domain", [
    "not a domain", "https://x.bitrix24.com", "x.bitrix24.com/path", "localhost", "-a.com",
    "a..b.com", "1.2.3.4", "x.bitrix24.com:443",
])
def test_portals_allow_refuses_what_is_not_a_domain_and_records_nothing(
    database: Database, domain: str
) -> None:
    one_line_failure(cli(service_env(database), "portals", "allow", "--domain", domain),
                     "domain")
    assert cli(service_env(database), "portals", "list", "--json").output == ""


@pytest.mark.parametrize("member_id", ["abc", "x" * 32, MEMBER_ID + "0", "some-domain"])
def test_portals_allow_refuses_what_is_not_a_member_id(database: Database, member_id: str) -> None:
    one_line_failure(
        cli(service_env(database), "portals", "allow", "--member-id", member_id), "member_id"
    )
    assert cli(service_env(database), "portals", "list", "--json").output == ""


def test_portals_allow_normalises_case(database: Database) -> None:
    env = service_env(database)
    assert cli(env, "portals", "allow", "--domain", "Some-Domain.Bitrix24.COM.").exit_code == 0
    assert cli(env, "portals", "allow", "--member-id", MEMBER_ID.upper()).exit_code == 0
    listed = [orjson.loads(line) for line in cli(env, "portals", "list", "--json").output.split()]
    assert {(p["member_id"], p["domain"]) for p in listed} == {(None, DOMAIN), (MEMBER_ID, None)}


@pytest.mark.parametrize(("kind", "flag", "value"), [
    ("deletions", "--type", "NOPE"), ("deletions", "--bot", "567"), ("bots", "--from",
    "2026-01-01T00:00:00Z"), ("bots", "--type", "ONIMBOTDELETE"),
])
def test_export_refuses_filters_that_do_not_apply(
    database: Database, kind: str, flag: str, value: str
) -> None:
    result = cli(service_env(database), "export", kind, flag, value)
    assert result.exit_code == 2
    assert f"{flag} does not apply to `export {kind}`" in result.output


def test_export_to_dash_is_standard_output(database: Database, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["export", "bots", "--output", "-"],
                                env=service_env(database))
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "-").exists()
    assert '"kind"' in result.stderr


async def test_portal_takes_a_member_id_or_a_domain(
    client: Client, database: Database
) -> None:
    await install_sample_portal(client)
    assert (await post(client, sample("onimbotdelete-1")))[0] == 200
    env = service_env(database)
    by_member, by_domain = [
        await asyncio.to_thread(cli, env, "events", "--json", "--portal", portal)
        for portal in (MEMBER_ID, DOMAIN.upper())
    ]
    assert by_member.exit_code == 0, by_member.output
    assert by_member.output == by_domain.output
    assert "ONIMBOTDELETE" in by_domain.output
    deleted = await asyncio.to_thread(cli, env, "bots", "--json", "--portal", DOMAIN)
    assert deleted.exit_code == 0, deleted.output
    assert orjson.loads(deleted.output.splitlines()[0])["portal_member_id"] == MEMBER_ID
    unknown = await asyncio.to_thread(cli, env, "events", "--portal", "other.bitrix24.com")
    one_line_failure(unknown, "other.bitrix24.com", "ledger portals list")


def test_a_domain_two_portals_have_had_is_refused_not_answered_for_one() -> None:
    """A portal renamed, and another that took its old name: both member_ids carry the domain.
    Answering `--portal DOMAIN` (or the API's `/rejections?portal=DOMAIN`) for the first found
    would leave the other's rows out of an answer that looks complete."""
    from ledger.errors import BadQuery
    from ledger.operations import portal_by_domain

    known = [("aaa", "old.bitrix24.com"), ("bbb", "new.bitrix24.com"), ("ccc", "old.bitrix24.com")]
    assert portal_by_domain("NEW.bitrix24.com", known) == "bbb"
    with pytest.raises(BadQuery, match="aaa, ccc"):
        portal_by_domain("old.bitrix24.com", known)


# ---- refusals: counted, and visible to auditors --------------------------------------------


def _forged(body: bytes) -> bytes:
    return body.replace(TOKEN.encode(), b"f" * 32)


async def test_rejections_are_listed_for_auditors_without_the_excerpt(
    client: Client, database: Database
) -> None:
    await install_sample_portal(client)
    status, _ = await post(client, _forged(sample("onimbotmessageadd-1")))
    assert status == 401
    env = service_env(database)
    listed = await asyncio.to_thread(cli, env, "rejections", "--json", "--portal", DOMAIN)
    assert listed.exit_code == 0, listed.output
    (row,) = [orjson.loads(line) for line in listed.output.splitlines()]
    assert row["reason"] == "invalid_application_token"
    assert row["portal_member_id"] == MEMBER_ID
    assert len(row["body_sha256"]) == 64
    assert len(row["rejection_hash"]) == 64
    assert "excerpt" not in row

    headers = await bearer(client)
    page = await get(client, "/rejections", headers, portal=DOMAIN, reason=row["reason"])
    assert [r["rejection_hash"] for r in page["items"]] == [row["rejection_hash"]]
    assert page["next_after"] is None
    assert (await get(client, "/rejections", headers, reason="nothing_like_it"))["items"] == []

    reader = await asyncpg.connect(database.admin_dsn)
    try:
        columns = {r["column_name"] for r in await reader.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = 'audit' AND table_name = 'rejections'")}
        granted = await reader.fetchval(
            "SELECT has_table_privilege('ledger_reader', 'audit.rejections', 'SELECT')")
        raw = await reader.fetchval(
            "SELECT has_table_privilege('ledger_reader', 'ledger.rejections', 'SELECT')")
    finally:
        await reader.close()
    assert "excerpt" not in columns
    assert {"reason", "received_at", "body_sha256"} <= columns
    assert granted
    assert not raw


async def test_every_refusal_is_counted_logged_or_not(
    make_client: Any, settings_factory: Any
) -> None:
    settings: Settings = settings_factory(rejections_per_second=0.01)  # burst 0.02: none logged
    client = await make_client(settings)
    await install_sample_portal(client)
    refused = 5
    for _ in range(refused):
        status, _ = await post(client, _forged(sample("onimbotmessageadd-1")))
        assert status == 401
    text = await (await client.get("/metrics")).text()
    assert _value(text, 'ledger_deliveries_rejected_total{reason="invalid_application_token"}') \
        == refused
    assert _value(text, "ledger_rejections_unlogged_total") == refused


def _value(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match is not None, f"{name} not in /metrics"
    return float(match.group(1))


# ---- a real service --------------------------------------------------------------------------


async def test_metrics_of_two_workers_add_up_and_never_go_backwards(
    database: Database, tmp_path: Path
) -> None:
    env = {**service_env(database), "LEDGER_DATA_DIR": str(tmp_path), "LEDGER_LOG_LEVEL": "WARNING"}
    async with serving(env, "--workers", "2", cwd=tmp_path) as base:
        # what a process killed while it created its metric file leaves behind (0 bytes; read
        # as it was, it failed every scrape: prometheus/client_python#1199)
        (tmp_path / "metrics" / "counter_999999.db").touch()
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        trusted = await asyncio.to_thread(
            cli, env, "portals", "trust", "--member-id", MEMBER_ID, "--token-file", str(token_file)
        )
        assert trusted.exit_code == 0, trusted.output
        sent, seen = 0, []
        body = sample("onimbotmessageadd-1")
        # a connection per request, so that SO_REUSEPORT spreads them over both workers
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for round_ in range(12):
                for i in range(10):
                    unique = body.replace(b"MESSAGE_ID%5D=", f"MESSAGE_ID%5D={round_}{i}".encode())
                    async with session.post(f"{base}/bitrix24/events", data=unique,
                                            headers={"Content-Type": FORM}) as response:
                        assert response.status == 200, await response.text()
                    sent += 1
                for _ in range(3):
                    async with session.get(f"{base}/metrics") as response:
                        text = await response.text()
                    seen.append(_value(text, "ledger_deliveries_received_total"))
                    assert f'ledger_portal_seconds_since_last_event{{member_id="{MEMBER_ID}"}}' \
                        in text
    assert seen == sorted(seen), seen  # never backwards, whichever worker answered
    assert seen[-1] == sent  # one scrape shows both workers


async def test_simulate_exits_non_zero_when_deliveries_were_refused(
    database: Database, tmp_path: Path
) -> None:
    env = {**service_env(database), "LEDGER_DATA_DIR": str(tmp_path), "LEDGER_LOG_LEVEL": "WARNING"}
    async with serving(env, cwd=tmp_path) as base:
        result = await asyncio.to_thread(
            cli, env, "simulate", "--url", f"{base}/bitrix24/events", "--count", "20",
            "--concurrency", "4",
        )
    one_line = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1, result.output
    assert len(one_line) == 1
    assert "refused" in one_line[0]


def _workers(parent: int) -> set[int]:
    """The worker processes of a `ledger serve --workers N` (not its resource tracker, nor its
    forwarder process, which names itself)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            match = re.search(r"^PPid:\s+(\d+)$", status, re.M)
            if (match is not None and int(match.group(1)) == parent
                    and b"spawn_main" in command
                    and not re.search(r"^Name:\s+ledger-forward", status, re.M)):
                found.add(int(entry.name))
    return found


def _serve_pid(port: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in command and str(port).encode() in command:
                return int(entry.name)
    raise AssertionError("no ledger serve process found")


async def _replaced(base: str, parent: int, victim: int) -> None:
    """Until two live workers serve again, the killed `victim` not one of them, and the service
    answers ready (a connection may still meet the dead worker's socket for a moment: that
    counts as not yet)."""
    async with asyncio.timeout(60):
        while True:  # polled: /proc offers no signal
            now = _workers(parent)
            if victim not in now and len(now) == 2:
                break
            await asyncio.sleep(0.05)
    async with aiohttp.ClientSession() as session, asyncio.timeout(60):
        while True:
            try:
                async with session.get(f"{base}/readyz") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def test_a_worker_killed_with_sigkill_is_replaced(database: Database, tmp_path: Path) -> None:
    """Found by a break test: a worker killed with -9 stayed dead (its spool undrained, its
    connections refused) while the parent went on as if nothing happened."""
    env = {**service_env(database), "LEDGER_DATA_DIR": str(tmp_path), "LEDGER_LOG_LEVEL": "WARNING"}
    port = free_port()
    async with serving(env, "--workers", "2", port=port, cwd=tmp_path) as base:
        parent = _serve_pid(port)
        async with asyncio.timeout(30):  # ready: both serve (the forwarder names itself soon)
            while True:  # polled: /proc offers no signal
                if len(workers := _workers(parent)) == 2:
                    break
                await asyncio.sleep(0.05)
        victim = min(workers)
        os.kill(victim, 9)
        await _replaced(base, parent, victim)


def _postmaster_pid(pgdata: Path) -> int | None:
    """The embedded server's postmaster, if one runs on `pgdata` (its pid file, and alive)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


async def test_embedded_server_stops_with_the_service_after_a_worker_was_killed(
    tmp_path: Path,
) -> None:
    """Found by the lead: on the embedded database, each worker of `serve --workers 2` opened the
    server itself and so was one of its registered users; one killed with -9 stayed registered,
    and the server kept running after the service had exited."""
    data_dir = tmp_path / "data"  # not "ledger": cwd is on sys.path of `python -m ledger`
    env = {"LEDGER_DATA_DIR": str(data_dir), "LEDGER_LOG_LEVEL": "WARNING"}
    port = free_port()
    async with serving(env, "--workers", "2", port=port, cwd=tmp_path,
                       stderr=tmp_path / "serve.log") as base:
        parent = _serve_pid(port)
        async with asyncio.timeout(60):
            while True:  # polled: /proc offers no signal
                if len(workers := _workers(parent)) == 2:
                    break
                await asyncio.sleep(0.05)
        assert _postmaster_pid(data_dir / "pgdata") is not None
        victim = min(workers)
        os.kill(victim, 9)
        await _replaced(base, parent, victim)  # serving from the same embedded server
    # `serving` has sent SIGTERM and seen the service exit: the server it started goes with it
    async with asyncio.timeout(30):
        while True:
            if _postmaster_pid(data_dir / "pgdata") is None:
                break
            await asyncio.sleep(0.05)
