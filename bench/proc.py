"""CPU time from /proc: a server with all its children, and a PostgreSQL cluster.

Wall-clock rates on a shared machine say little; CPU seconds spent per delivery answered say
what a delivery costs. Both benches sample before and after a measured interval:

    meter = CpuMeter(server_pid, postmaster_pid(admin_dsn))
    before = meter.sample(); …load…; spent = meter.sample() - before

A process tree's CPU is, over every process alive in it, utime + stime (all its threads) plus
cutime + cstime (the children it has reaped): a child that exits between two samples moves its
time into its parent's reaped share, so the sum never loses it. What a process that is not a
child of the tree does for it (wrk, the load generator) is not counted.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and its reaped children), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return int(fields[1]), ticks / _TICK


def _all() -> dict[int, tuple[int, float]]:
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def _tree(root: int, table: dict[int, tuple[int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def descendants(root: int) -> list[int]:
    """`root` and every process descending from it now (empty if `root` is gone)."""
    table = _all()
    return _tree(root, table) if root in table else []


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of `root` and every process descending from it (see the module docstring)."""
    table = _all()
    if root not in table:
        raise ProcessLookupError(f"process {root} is gone")
    return sum(table[pid][1] for pid in _tree(root, table))


async def postmaster_pid(admin_dsn: str) -> int | None:
    """The postmaster of the cluster behind `admin_dsn`, if it runs on this machine: the parent
    of our own backend. None when that cannot be seen from here (a remote cluster)."""
    connection = await asyncpg.connect(admin_dsn)
    try:
        # read while the backend lives: after close it exits and its /proc entry goes
        stat = _stat(int(await connection.fetchval("SELECT pg_backend_pid()")))
    finally:
        await connection.close()
    return None if stat is None else stat[0]


@dataclass(frozen=True)
class CpuSample:
    server: float
    postgres: float | None

    def __sub__(self, other: CpuSample) -> CpuSample:
        postgres = (None if self.postgres is None or other.postgres is None
                    else self.postgres - other.postgres)
        return CpuSample(self.server - other.server, postgres)


class CpuMeter:
    """CPU seconds so far of one server's process tree and of one PostgreSQL cluster."""

    def __init__(self, server_pid: int, postmaster: int | None) -> None:
        self.server_pid, self.postmaster = server_pid, postmaster

    def sample(self) -> CpuSample:
        postgres = None if self.postmaster is None else tree_cpu_seconds(self.postmaster)
        return CpuSample(tree_cpu_seconds(self.server_pid), postgres)

    def settle(self, *, idle_share: float = 0.05, window: float = 0.5,
               deadline: float = 15.0) -> bool:
        """Wait until the server and the cluster use less than `idle_share` of a core over a
        `window` (a projector catching up after the last load, a checkpoint) — at most
        `deadline` seconds. True if they settled."""
        end = time.monotonic() + deadline
        while True:
            before = self.sample()
            time.sleep(window)  # the measuring window itself, not a wait for a condition
            spent = self.sample() - before
            busy = spent.server + (spent.postgres or 0.0)
            if busy < idle_share * window:
                return True
            if time.monotonic() > end:
                return False


def per_delivery_us(seconds: float | None, deliveries: int) -> float | None:
    """CPU µs per delivery, or None when not measured or nothing was delivered."""
    if seconds is None or deliveries <= 0:
        return None
    return seconds * 1e6 / deliveries
