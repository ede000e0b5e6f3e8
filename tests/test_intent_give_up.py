"""Attacks on the lifecycle intent's place (breakintent): the append timeout at each step.

The intent (`JournalTurn.intend`) is written in a thread, once the batch is judged and before its
COMMIT. Given up on while that thread writes it, the append sends no COMMIT — yet the intent
stayed in the journal unresolved: its portals in doubt for every worker offline (their installs
and uninstalls answered 503 `lifecycle_in_doubt`, which Bitrix24 does not resend) until a worker
reached PostgreSQL again, for a COMMIT that never was.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeAlias

import asyncpg
import pytest

from ledger.errors import LifecycleInDoubt
from ledger.models import Duplicate, Spooled, Stored, Transaction
from ledger.offline import JournalTurn, OfflineTrust, _read
from ledger.operations import change_trust
from ledger.settings import Settings
from ledger.storage.store import create_pool
from ledger.trust import TrustChange
from tests.conftest import MEMBER_ID, ClientFactory, Database, sample
from tests.helpers import Client, allow_sample_portal, install_sample_portal
from tests.test_intake import forge
from tests.test_offline_doubt import no_doubt, uninstalls
from tests.test_offline_failover import _draft, _Worker
from tests.test_trust_outage import known_everywhere, reinstall, spooled

Admin: TypeAlias = "asyncpg.Connection[Any]"


async def test_given_up_while_writing_its_intent_an_append_leaves_no_doubt(
    make_client: ClientFactory, outage: Any, settings_factory: Any, tmp_path: Path,
    admin: Admin, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 0's uninstall is judged; its intent's write (an fsync: a slow disk) outlasts the
    append timeout; the committer gives the append up and spools the batch (202). The append
    then stops before its COMMIT (rolled back: nothing stored). On main the intent stayed: the
    portal in doubt, worker 1 offline answered the genuine reinstall 503 lifecycle_in_doubt.
    The intent is resolved when its write ends after the give-up, under the same lock."""
    relay, settings_for = outage
    direct = settings_factory(spool_retry_seconds=3600, spool_dir=tmp_path / "spool", worker=0,
                              append_timeout_seconds=0.5, trust_refresh_seconds=3600)
    stalled: Client = await make_client(direct)
    cut_off: Client = await make_client(settings_for(worker=1, trust_refresh_seconds=3600))
    await install_sample_portal(stalled)
    await allow_sample_portal(stalled)
    await known_everywhere(stalled, cut_off)

    gave_up = threading.Event()
    intend = OfflineTrust._intend
    give_up = JournalTurn.give_up

    def slow_intend(self: OfflineTrust, handle: IO[bytes], keys: list[list[str]],
                    transaction: Transaction) -> list[list[str]] | None:
        assert gave_up.wait(15), "the append was not given up on"
        return intend(self, handle, keys, transaction)

    def giving_up(self: JournalTurn) -> Any:
        try:
            return give_up(self)
        finally:
            gave_up.set()

    monkeypatch.setattr(OfflineTrust, "_intend", slow_intend)
    monkeypatch.setattr(JournalTurn, "give_up", giving_up)
    await spooled(stalled, sample("onappuninstall-1"))  # given up on mid-intent
    monkeypatch.setattr(OfflineTrust, "_intend", intend)
    assert gave_up.is_set()
    assert await uninstalls(admin) == 0  # no COMMIT was sent
    assert no_doubt(direct)  # on main: the intent's doubt, never resolved

    await relay.cut()
    await spooled(cut_off, reinstall())  # on main: 503 lifecycle_in_doubt


async def test_a_stored_install_beside_a_doubtful_uninstall_leaves_its_portal_judged(
    database: Database, settings: Settings, tmp_path: Path,
) -> None:
    """A redelivery of the stored install and the uninstall in one batch, given up on
    mid-COMMIT: the uninstall may have committed (in doubt, spooled: its entry stands for it).
    The install copy is a duplicate (this worker's own commit) and moves no trust, committed or
    not — but the spool's doubt named it too, with no journal entry standing for it, so the
    portal was *bare*: every delivery of it answered 503 by every worker offline, not only its
    installs and uninstalls."""
    pool = await create_pool(database.service_dsn, size=2)
    try:
        worker = _Worker(pool, tmp_path / "trust")
        await worker.offline.start(worker.process.store)
        await change_trust(worker.process.store, TrustChange.ALLOWED, member_id=MEMBER_ID,
                           actor="test")
        install = _draft(settings, sample("onappinstall-1"))
        (stored,) = await worker.appender.append([install])
        assert isinstance(stored, Stored), stored
        copy = _draft(settings, sample("onappinstall-1"))
        uninstall = _draft(settings, sample("onappuninstall-1"))
        doubt = (worker.offline._open_exclusive(), frozenset([MEMBER_ID]),
                 Transaction(10**9, 1, datetime.now(UTC).isoformat()))
        answers = worker.offline.spool([copy, uninstall], lambda _: None, doubt=doubt)
        assert isinstance(answers[0], Duplicate), answers
        assert isinstance(answers[1], Spooled), answers

        other = _Worker(pool, tmp_path / "trust", number=1)
        with (tmp_path / "trust" / "journal.log").open("rb") as handle:
            journal = _read(handle)
        assert journal.doubted() == {MEMBER_ID}  # the uninstall: rightly in doubt
        assert not journal.bare()  # on main: the install copy's doubt, with no entry
        (message,), _ = other.offline_answers(
            [_draft(settings, forge("onimbotjoinchat-1", ts="1796526401"))])
        assert not isinstance(message, LifecycleInDoubt), message  # judged on the uninstall
    finally:
        await pool.close()
