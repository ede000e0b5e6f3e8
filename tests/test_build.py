"""The optional speed-ups: the compiled build is off unless asked for, and `serve` runs on
uvloop when it is installed (asyncio otherwise). Which build the suite tests: tests/conftest.py."""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from click.testing import CliRunner

from ledger.cli import main
from ledger.cli.service import _event_loop
from tests.conftest import FORM, MEMBER_ID, TOKEN, Database, compiled_modules, sample
from tests.servers import serving


def test_every_listed_module_exists_and_is_pure_or_compiled_as_the_run_expects() -> None:
    """The list is the one place: a module renamed away from it fails here, not in a release."""
    for name in compiled_modules():
        path = Path(__file__).resolve().parent.parent / (name.replace(".", "/") + ".py")
        assert path.is_file(), f"{name} is listed for the compiled build but has no source"


def test_without_uvloop_serve_runs_on_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    loop, which = _event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio")
        assert which.startswith("asyncio event loop, ")
    finally:
        loop.close()


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_serve_runs_on_uvloop_when_installed_and_stores_a_delivery(
    database: Database, tmp_path: Path, workers: str
) -> None:
    """`pip install 'ledger[fast]'` (and the dev extra): every serving process picks uvloop's
    loop, says so once, and a delivery is stored through it."""
    pytest.importorskip("uvloop")
    env = {"LEDGER_DATABASE_URL": database.service_dsn,
           "LEDGER_ADMIN_DATABASE_URL": database.admin_dsn, "LEDGER_DATA_DIR": str(tmp_path)}
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    trusted = await asyncio.to_thread(
        CliRunner().invoke, main,
        ["portals", "trust", "--member-id", MEMBER_ID, "--token-file", str(token_file)], env=env,
    )
    assert trusted.exit_code == 0, trusted.output
    log = tmp_path / "serve.log"
    async with serving(env, "--workers", workers, cwd=tmp_path, stderr=log) as base:
        async with aiohttp.ClientSession() as session, session.post(
            f"{base}/bitrix24/events", data=sample("onimbotmessageadd-1"),
            headers={"Content-Type": FORM},
        ) as response:
            answer = await response.json()
        assert response.status == 200, answer
        assert answer["status"] == "stored"
        # /readyz may have come from one worker while the other still started: wait for both
        async with asyncio.timeout(60):
            while True:
                said = [line for line in log.read_text().splitlines() if "event loop" in line]
                if len(said) >= int(workers):
                    break
                await asyncio.sleep(0.05)
    assert len(said) == int(workers), said  # once per serving process, not per request
    assert all(f"uvloop {version('uvloop')} event loop" in line for line in said), said
    connection = await asyncpg.connect(database.admin_dsn)
    try:
        stored = await connection.fetchval(
            "SELECT count(*) FROM ledger.events WHERE position = $1", answer["position"])
    finally:
        await connection.close()
    assert stored == 1
