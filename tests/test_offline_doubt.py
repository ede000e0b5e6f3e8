"""A lifecycle doubt is settled by any worker that reaches PostgreSQL, and outlives its worker.

An online append of installs or uninstalls given up on (or cut off, or killed) with its COMMIT in
flight may have committed or not; its portals' installs and uninstalls are answered 503
`lifecycle_in_doubt` offline meanwhile, and Bitrix24 does not resend a 503. The doubt used to
last until the worker that recorded it drained the batch — never, when that worker number no
longer ran — and was lost when no spool followed (the spool refused the batch, the worker was
killed mid-COMMIT). Now the append's transaction is in the journal before its COMMIT (the
intent), and any worker that reaches PostgreSQL settles the doubt (`OfflineTrust.settle_doubts`):
ending the transaction if it still runs, then reading what it committed.
Worker 0 reaches PostgreSQL through a relay the tests cut, unless said otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any, TypeAlias

import aiohttp
import asyncpg
import pytest

from ledger.errors import LifecycleInDoubt, SpoolUnwritable
from ledger.models import Refusal
from ledger.offline import _read
from ledger.operations import change_trust
from ledger.settings import Settings, TrustPolicy
from ledger.spool import Spool
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from tests.conftest import FORM, MEMBER_ID, ClientFactory, Database, sample
from tests.gateway_helpers import eventually
from tests.helpers import Client, allow_sample_portal, drained, install_sample_portal
from tests.servers import free_port
from tests.test_crash import reaper, start_server  # noqa: F401 - reaper: a fixture
from tests.test_offline_failover import _draft, _Worker
from tests.test_offline_turn import (
    commits_stalled,
    committing,
    stored_uninstall,
    uninstall_landed_after_cut,
)
from tests.test_trust_outage import known_everywhere, refused, reinstall, spooled, stored_types

Admin: TypeAlias = "asyncpg.Connection[Any]"


async def uninstalls(admin: Admin) -> int:
    return int(await admin.fetchval(
        "SELECT count(*) FROM ledger.events WHERE event_type = 'ONAPPUNINSTALL'"))


def no_doubt(settings: Settings) -> bool:
    """Whether the journal records no doubt (any worker's)."""
    with (settings.trust_dir / "journal.log").open("rb") as handle:
        return not _read(handle).doubts


async def test_a_commit_stalled_for_good_is_ended_and_its_spooled_batch_stored_once(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin,
) -> None:
    """Worker 0's uninstall is given up on mid-COMMIT, and its COMMIT stays stalled; worker 0
    is cut off. Worker 1 reaches PostgreSQL: a reinstall there met the doubt (503) for as long
    as worker 0 stayed cut off. Now worker 1 ends the stalled transaction (same role), finds
    the uninstall not stored — the doubt is settled: the spooled uninstall stands as any
    spooled lifecycle entry, and the reinstall is spooled behind it (202). Worker 0's drain
    then stores the uninstall, exactly once, and worker 1's the reinstall after it."""
    relay, settings_for = outage
    cut_off: Client = await make_client(settings_for(worker=0, append_timeout_seconds=0.5,
                                                     trust_refresh_seconds=3600))
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=1,
                              trust_refresh_seconds=3600)
    online: Client = await make_client(direct)
    await install_sample_portal(online)
    await allow_sample_portal(online)
    await known_everywhere(online, cut_off)

    async with commits_stalled(admin):
        await spooled(cut_off, sample("onappuninstall-1"))  # given up on mid-COMMIT
        await relay.cut()
        assert await committing(admin)
        assert not no_doubt(direct)
        await asyncio.wait_for(spooled(online, reinstall()), 15)
        assert not await committing(admin)  # ended, not committed
        assert no_doubt(direct)
    assert await uninstalls(admin) == 0
    await relay.start()
    await drained(cut_off)
    await drained(online)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]


async def test_a_doubt_whose_worker_no_longer_runs_is_settled_by_another(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin, caplog: pytest.LogCaptureFixture,
) -> None:
    """Worker 0's uninstall is given up on mid-COMMIT; worker 0 is cut off and then stops (a
    restart with fewer `--workers`): nobody drains its spool, and worker 2, offline, answered
    the portal's installs 503 for good. Worker 1, started with PostgreSQL reachable, settles
    the doubt on its own (its trust refresh) — the COMMIT landed: the uninstall is shared — and
    worker 2 judges the reinstall again. Each 503 logged an ERROR (the HTTP layer's); now one
    ERROR a doubt, the repeats counted."""
    relay, settings_for = outage
    stopping: Client = await make_client(settings_for(worker=0, append_timeout_seconds=0.5,
                                                      trust_refresh_seconds=3600))
    elsewhere = settings_for(worker=2, trust_refresh_seconds=3600)
    cut_off: Client = await make_client(elsewhere)
    await install_sample_portal(stopping)
    await allow_sample_portal(stopping)
    await known_everywhere(stopping, cut_off)

    await uninstall_landed_after_cut(stopping, relay, admin)
    await stopping.close()

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            await refused(cut_off, reinstall(), 503, "lifecycle_in_doubt")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "in doubt" in errors[0].getMessage()

    online: Client = await make_client(
        settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=1,
                         trust_refresh_seconds=0.1))
    assert online.app is not None
    await eventually(lambda: no_doubt(elsewhere))
    await spooled(cut_off, reinstall())
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL", "ONAPPINSTALL"]


async def test_a_doubt_outlives_a_spool_that_refused_its_batch(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 0 (reaching PostgreSQL directly) gives its uninstall up mid-COMMIT, and its spool
    refuses the batch (503): the doubt went with it, and worker 1, offline, answered 202 to a
    delivery under the token the uninstall ended when its COMMIT landed — refused on drain.
    The intent written before the COMMIT keeps the doubt: with nothing spooled standing for
    the uninstall, none of the portal's deliveries is judged offline; once worker 0 settles it
    (the COMMIT landed: shared), worker 1 refuses the delivery at once."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=0.1, spool_dir=tmp_path / "spool", worker=0,
                              append_timeout_seconds=0.5, trust_refresh_seconds=3600)
    online: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1, trust_refresh_seconds=3600))
    await install_sample_portal(online)
    await known_everywhere(online, cut_off)
    await relay.cut()
    original = Spool.append

    def unwritable(self: Spool, drafts: Any, *, past_limit: bool = False) -> None:
        if past_limit:
            raise SpoolUnwritable("the disk failed (test)")
        original(self, drafts, past_limit=past_limit)

    monkeypatch.setattr(Spool, "append", unwritable)

    async with commits_stalled(admin):
        await asyncio.wait_for(
            refused(online, sample("onappuninstall-1"), 503, "store_unavailable"), 15)
        assert await committing(admin)
        await refused(cut_off, sample("onimbotjoinchat-1"), 503, "lifecycle_in_doubt")
    await eventually(lambda: stored_uninstall(admin))
    # worker 0 reaches PostgreSQL: a delivery of the portal settles the doubt there first
    await refused(online, sample("onimbotjoinchat-1"), 403, "portal_uninstalled")
    assert no_doubt(direct)
    await refused(cut_off, sample("onimbotjoinchat-1"), 403, "portal_uninstalled")
    await relay.start()
    await drained(cut_off)
    assert await stored_types(admin) == ["ONAPPINSTALL", "ONAPPUNINSTALL"]


async def test_a_doubt_outlives_a_worker_killed_mid_commit(
    database: Database, admin: Admin, settings: Settings, tmp_path: Path,
    reaper: list[asyncio.subprocess.Process],  # noqa: F811 - the fixture imported above
) -> None:
    """`kill -9` of a worker whose uninstall's COMMIT is in flight: nothing spooled, nothing
    in the journal — another worker, offline, judged the portal without the uninstall its
    COMMIT then landed (the backend outlives its client). The intent written before the COMMIT
    is the doubt; once PostgreSQL answers (the COMMIT landed), it is settled and shared."""
    port = free_port()
    server = await start_server(database, port, tmp_path, {
        "LEDGER_APPEND_TIMEOUT_SECONDS": "60", "LEDGER_TRUST_REFRESH_SECONDS": "3600"})
    reaper.append(server)
    url = f"http://127.0.0.1:{port}/bitrix24/events"
    pool = await create_pool(database.service_dsn, size=2)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
        await change_trust(store, TrustChange.ALLOWED, member_id=MEMBER_ID, actor="test")
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=sample("onappinstall-1"),
                                    headers={"Content-Type": FORM}) as response:
                assert response.status == 200

            async def uninstall() -> None:
                async with session.post(url, data=sample("onappuninstall-1"),
                                        headers={"Content-Type": FORM}):
                    pass

            async with commits_stalled(admin):
                uninstalling = asyncio.create_task(uninstall())
                await eventually(lambda: committing(admin))
                server.send_signal(signal.SIGKILL)
                await server.wait()
                with pytest.raises(aiohttp.ClientError):
                    await uninstalling
                other = _Worker(pool, tmp_path / "spool" / "trust", number=1)
                await other.offline.start(store)
                joining = [_draft(settings, sample("onimbotjoinchat-1"))]
                answers, _ = await asyncio.to_thread(other.offline_answers, joining)
                assert isinstance(answers[0], LifecycleInDoubt), answers
        await eventually(lambda: stored_uninstall(admin))  # landed after its worker died
        assert await other.offline.settle_doubts(store) == frozenset()
        answers, _ = await asyncio.to_thread(other.offline_answers, joining)
        assert isinstance(answers[0], Refusal), answers
        assert answers[0].code == "portal_uninstalled"
    finally:
        await pool.close()
