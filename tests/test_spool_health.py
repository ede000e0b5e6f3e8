"""Readiness never waits for the spool's lock: a hung fsync parks no thread per probe."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from pathlib import Path

from ledger.spool import FileOps, Spool
from tests.gateway_helpers import eventually
from tests.test_spool import some_drafts


class HungFsync:
    """An fsync that hangs until released (a disk that stopped answering)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hang = False

    def __call__(self, fd: int) -> None:
        if self.hang:
            self.entered.set()
            self.release.wait(60)
        os.fsync(fd)


async def test_readiness_probes_during_a_hung_fsync_park_no_thread_and_report_the_stall(
    tmp_path: Path,
) -> None:
    fsync = HungFsync()
    spool = Spool(tmp_path, max_bytes=1 << 20,
                  files=dataclasses.replace(FileOps(), fsync=fsync))
    first, second = some_drafts(2)[:2]
    spool.append([first])
    fsync.hang = True
    writer = threading.Thread(target=spool.append, args=([second],), daemon=True)
    writer.start()
    try:
        assert await asyncio.to_thread(fsync.entered.wait, 10)
        baseline = threading.active_count()
        probes = [threading.Thread(target=spool.health, daemon=True) for _ in range(50)]
        for probe in probes:
            probe.start()
        # every probe answers at once (on main each one waited for the lock, for good)
        await eventually(lambda: not any(p.is_alive() for p in probes), within=10)
        assert threading.active_count() <= baseline
        assert spool.health() is None  # held briefly: an ordinary write, still ready
        stalled = spool.health(stalled_after=0)
        assert stalled is not None
        assert stalled.startswith("stalled: its append has held it since ")
    finally:
        fsync.release.set()
        writer.join(10)
    assert spool.health(stalled_after=0) is None  # the write ended: not stalled any more
    assert spool.read(10).drafts == [first, second]
