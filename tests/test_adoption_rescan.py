"""An adopted spool is checked once, not every pass, while its file stays the same.

Each adoption pass opened the orphan spool anew, and opening it CRC-checks every undrained
record (~3 s per GiB against a 1-s pass). The pass now keeps what it checked (`Scanned`) and
the next one reads the log again only when it is another file or changed: replaced, truncated,
grown, drained by someone else. PostgreSQL is away here (the gate says no): a pass is the
opening alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, cast

import pytest

from ledger.adoption import SpoolAdopter
from ledger.errors import SpoolBusy
from ledger.offline import OfflineTrust
from ledger.settings import TrustPolicy
from ledger.spool import Spool, claim, claim_own
from tests.gateway_helpers import eventually
from tests.test_spool import some_drafts


async def away() -> bool:
    return False


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The spool logs read through (checked record by record) as they were opened."""
    done: list[Path] = []
    recover = Spool._recover

    def counted(spool: Spool) -> int:
        done.append(spool.directory)
        return recover(spool)

    monkeypatch.setattr(Spool, "_recover", counted)
    return done


def adopter_of(root: Path) -> SpoolAdopter:
    return SpoolAdopter(
        root, worker=0, store=cast(Any, None),
        offline=OfflineTrust(root / "trust", worker=0, policy=TrustPolicy.ALLOWLIST),
        gate=away, max_bytes=1 << 20, max_events=10, retry_seconds=1.0, append_timeout=None)


def orphan(root: Path) -> Path:
    directory = root / "worker-1"
    Spool(directory, max_bytes=1 << 20).append(some_drafts(3))
    return directory


async def test_an_unchanged_orphan_spool_is_read_through_once(
    tmp_path: Path, reads: list[Path]
) -> None:
    directory = orphan(tmp_path)
    reads.clear()
    adopter = adopter_of(tmp_path)
    for _ in range(4):
        await adopter.look()
        assert adopter.absent[1].bytes == (directory / "spool.log").stat().st_size
    assert reads == [directory]


async def test_a_replaced_truncated_or_grown_orphan_spool_is_read_again(
    tmp_path: Path, reads: list[Path]
) -> None:
    directory = orphan(tmp_path)
    log = directory / "spool.log"
    adopter = adopter_of(tmp_path)
    await adopter.look()
    reads.clear()

    whole = log.read_bytes()
    replacement = directory / "spool.new"
    replacement.write_bytes(whole[:-5])  # another file, with a torn last record
    replacement.replace(log)
    await adopter.look()
    assert reads == [directory]
    assert len(list(directory.glob("spool.corrupt-*"))) == 1  # found, set aside, not stored

    with log.open("r+b") as handle:  # the same file, cut short
        handle.truncate(log.stat().st_size - 3)
    await adopter.look()
    assert reads == [directory] * 2
    assert len(list(directory.glob("spool.corrupt-*"))) == 2  # each kept

    Spool(directory, max_bytes=1 << 20).append(some_drafts(1))  # grown
    reads.clear()
    await adopter.look()
    assert reads == [directory]
    await adopter.look()
    assert reads == [directory]  # unchanged since: not again


async def test_a_spool_held_by_another_process_at_a_look_is_read_again_after(
    tmp_path: Path, reads: list[Path]
) -> None:
    """Its worker came back for a while (and may have written it): what was checked is gone."""
    directory = orphan(tmp_path)
    adopter = adopter_of(tmp_path)
    await adopter.look()
    reads.clear()
    fd = claim(directory, holder=1)
    assert fd is not None
    try:
        await adopter.look()
    finally:
        os.close(fd)
    assert reads == []
    await adopter.look()
    assert reads == [directory]


async def test_a_returning_worker_waits_for_an_adopting_worker_past_the_wait_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """It exited `SpoolBusy` after the wait when an adoption pass held its spool that long
    (a pass stalled on a hung disk, or checking a huge spool): it keeps waiting now, logged
    with the holder; a process of its own number holding it is still a second `serve`."""
    directory = orphan(tmp_path)
    adopting = claim(directory, holder=0)  # worker 0, in an adoption pass
    assert adopting is not None
    with caplog.at_level(logging.WARNING, logger="ledger.spool"):
        returning = asyncio.ensure_future(claim_own(directory, worker=1, seconds=0.05))
        try:
            await eventually(lambda: sum("held for" in r.getMessage()
                                         for r in caplog.records) >= 2)
            assert not returning.done()
            (said, *_) = [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]
            assert f"by worker 0 (pid {os.getpid()})" in said
        finally:
            os.close(adopting)
        os.close(await asyncio.wait_for(returning, 10))  # the pass ended: it takes its spool

    second = claim(directory, holder=1)  # a second `serve` of worker 1
    assert second is not None
    try:
        with pytest.raises(SpoolBusy, match="second `ledger serve`"):
            await claim_own(directory, worker=1, seconds=0.05)
    finally:
        os.close(second)


@pytest.mark.parametrize("torn", [{"worker": 1, "pid": 1}, None], ids=["own-stale", "empty"])
async def test_a_holder_note_read_in_the_instant_it_is_rewritten_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: dict[str, int] | None,
) -> None:
    """Found by a break round: a holder notes itself just after taking the lock (truncate,
    then write). A returning worker reading the note at its deadline in that instant saw none,
    or its own number from its last life, and exited `SpoolBusy` ("a second `ledger serve`")
    while an adoption pass held its spool. It reads the note again a poll later."""
    directory = orphan(tmp_path)
    adopting = claim(directory, holder=0)
    assert adopting is not None
    notes = iter([torn])  # its own stale note, or the empty one, in that instant
    read: list[int] = []

    def holder_of(_: Path) -> dict[str, int] | None:
        read.append(1)
        note = next(notes, {"worker": 0, "pid": os.getpid()})
        if len(read) == 2:
            os.close(adopting)  # the pass ends
        return note

    monkeypatch.setattr("ledger.spool.holder_of", holder_of)
    os.close(await asyncio.wait_for(claim_own(directory, worker=1, seconds=0.05), 10))
    assert len(read) == 2
