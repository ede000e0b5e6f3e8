"""The package as it is installed, and the database as it is backed up."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import asyncpg
from click.testing import CliRunner

from ledger import embedded, migrations
from ledger.cli import main
from ledger.storage.target import SERVICE_ROLE, with_login
from tests.conftest import Database, sample
from tests.helpers import Client, install_sample_portal, post

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_every_migration(tmp_path: Path) -> None:
    """A normal install migrates: alembic's script directory is package data."""
    source = tmp_path / "source"  # a copy: building in place would leave build/ behind
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "__pycache__", ".*_cache", ".ledger", "build", "dist",
        "out", "*.so"))  # bench/out: a benchmark's PostgreSQL (its socket cannot be copied)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path),
         str(source)],
        check=False, capture_output=True, timeout=600, cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr.decode()
    (wheel,) = tmp_path.glob("ledger-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # pure Python unless LEDGER_MYPYC=1 asks for the compiled build (setup.py)
    assert not [name for name in names if name.endswith(".so")]
    assert wheel.name.endswith("-py3-none-any.whl")
    revisions = sorted(p.name for p in (migrations.SCHEMA_DIR / "versions").glob("*.py"))
    assert revisions
    assert {f"ledger/schema/versions/{name}" for name in revisions} <= names
    assert {"ledger/schema/env.py", "ledger/schema/script.py.mako"} <= names
    assert not (ROOT / "schema").exists(), "revisions belong in ledger/schema/versions"


def _bin(name: str) -> str:
    import pgserver  # the client programs come with the embedded server's binaries

    return str(Path(pgserver.__file__).parent / "pginstall" / "bin" / name)


async def test_pg_dump_restored_into_a_new_cluster_verifies(
    client: Client, database: Database, tmp_path: Path
) -> None:
    """docs/operations.md "Backups and restore", step by step."""
    await install_sample_portal(client)
    for name in ["onimbotjoinchat-1", "onimbotmessageadd-1", "onimbotdelete-1"]:
        assert (await post(client, sample(name)))[0] == 200
    assert (await post(client, sample("onimbotdelete-1").replace(b"831c76", b"000000")))[0] == 401
    dump = tmp_path / "ledger.dump"
    await asyncio.to_thread(subprocess.run, [
        _bin("pg_dump"), "--format=custom", "--file", str(dump), database.admin_dsn,
    ], check=True, capture_output=True, timeout=120)

    handle = await asyncio.to_thread(embedded.start, tmp_path / "restored")
    try:
        maintenance = handle.dsn("postgres")
        connection = await asyncpg.connect(maintenance)
        try:
            await connection.execute('CREATE DATABASE "ledger"')
            for role in ("ledger_owner NOLOGIN", "ledger_app LOGIN", "ledger_projector LOGIN",
                         "ledger_reader NOLOGIN"):
                await connection.execute(f"CREATE ROLE {role}")
        finally:
            await connection.close()
        admin = with_login(maintenance, database="ledger")
        await asyncio.to_thread(subprocess.run, [
            _bin("pg_restore"), "--exit-on-error", "--dbname", admin, str(dump),
        ], check=True, capture_output=True, timeout=120)
        env = {"LEDGER_DATABASE_URL": with_login(admin, user=SERVICE_ROLE),
               "LEDGER_ADMIN_DATABASE_URL": admin}
        verified = await asyncio.to_thread(
            CliRunner().invoke, main, ["verify", "--quiet"], env=env
        )
        assert verified.exit_code == 0, verified.output
        assert "events: 6 rows verified" in verified.output  # allowance, install+trust, 3
        assert "rejections: 1 rows verified" in verified.output
    finally:
        await asyncio.to_thread(handle.server.stop)
