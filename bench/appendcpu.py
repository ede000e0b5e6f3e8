"""What one `ledger.append_events` call costs its backend, against a variant of the function.

    python -m bench.appendcpu VARIANT.sql [--events 1] [--calls 1000]

VARIANT.sql creates `ledger.append_events_v2` with the same signature (a rewrite to try, or the
function with one part taken out, to price that part). On a fresh database of an embedded
PostgreSQL at the head revision, one service-role connection calls the two functions
alternately (the order swapped every call), each call its own transaction committed
durably, `--events` events per call; each call's backend CPU is read from
/proc/<backend>/schedstat (nanoseconds) around it. Paired call by call, a machine shared with
other work drifts against both alike: compare the medians of one run, never across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.common import OUT
from ledger import embedded, migrations

_CALL = ("SELECT start_position, start_hash, end_hash FROM ledger.{}($1, $2, $3, $4, $5, $6, "
         "$7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)")
_FIRST = bytes([1]) * 32


def _cpu(pid: int) -> float:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def _payload(serial: int) -> str:
    """About 2 KB of JSON, as a Bitrix24 message delivery's stored payload is."""
    return orjson.dumps({"event": "ONIMBOTMESSAGEADD", "serial": serial, "data": {
        f"field_{i}": hashlib.sha256(b"%d/%d" % (serial, i)).hexdigest()[:32]
        for i in range(40)}}).decode()


def _arguments(first: int, events: int) -> list[Any]:
    serials = range(first, first + events)
    now = datetime.now(UTC)

    def digest(tag: str, serial: int) -> bytes:
        return hashlib.sha256(f"{tag}{serial}".encode()).digest()

    members = [f"m{s % 20}" for s in serials]
    return [1, _FIRST, members[:1], members, ["ONIMBOTMESSAGEADD"] * events,
            ["bitrix24"] * events, [f"{{{s}}}" for s in serials], [None] * events,
            [now] * events, [digest("k", s) for s in serials], [digest("b", s) for s in serials],
            [_payload(s) for s in serials], [digest("p", s) for s in serials],
            ['{"query": ""}'] * events, [digest("e", s) for s in serials],
            ['{"f": 1}'] * events, True]


async def run(variant: str, events: int, calls: int) -> dict[str, list[float]]:
    handle = embedded.start(OUT / "pg-appendcpu")
    try:
        admin = await asyncpg.connect(handle.dsn("postgres"))
        await admin.execute("DROP DATABASE IF EXISTS appendcpu WITH (FORCE)")
        await admin.execute("CREATE DATABASE appendcpu")
        await admin.close()
        await asyncio.to_thread(migrations.upgrade, handle.dsn("appendcpu"))
        owner = await asyncpg.connect(handle.dsn("appendcpu"))
        await owner.execute(variant)
        await owner.execute(
            "ALTER FUNCTION ledger.append_events_v2 OWNER TO ledger_owner; "
            "GRANT EXECUTE ON FUNCTION ledger.append_events_v2 TO ledger_app")
        # one event to check the history against (the function's first check)
        await owner.execute(
            "INSERT INTO ledger.events (position, member_id, event_type, origin, bot_ids, "
            "received_at, dedup_key, payload, payload_sha256, metadata, prev_hash, hash) "
            "VALUES (1, 'm0', 'X', 'bitrix24', '{}', now(), $1, '{}', $1, '{}', $2, $1)",
            _FIRST, bytes(32))
        await owner.execute(
            "UPDATE ledger.stream_heads SET position = 1, hash = $1 WHERE stream = 'events'",
            _FIRST)
        await owner.close()
        connection = await asyncpg.connect(handle.dsn("appendcpu", user="ledger_app"),
                                           server_settings={"synchronous_commit": "on"})
        backend = connection.get_server_pid()
        names = ["append_events", "append_events_v2"]
        spent: dict[str, list[float]] = {name: [] for name in names}
        serial = 0
        for call in range(calls + 20):
            for name in names if call % 2 == 0 else names[::-1]:
                serial += events
                arguments = _arguments(serial, events)
                before = _cpu(backend)
                found = await connection.fetchrow(_CALL.format(name), *arguments)
                if call >= 20:  # the first calls plan and warm caches
                    spent[name].append((_cpu(backend) - before) * 1e6)
                assert found is not None, f"{name} refused the batch"
        await connection.close()
        return spent
    finally:
        handle.server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", type=Path, help="SQL creating ledger.append_events_v2")
    parser.add_argument("--events", type=int, default=1, help="events per call")
    parser.add_argument("--calls", type=int, default=1000, help="calls of each function")
    args = parser.parse_args()
    spent = asyncio.run(run(args.variant.read_text(), args.events, args.calls))
    print(f"`python -m bench.appendcpu {args.variant.name} --events {args.events} --calls "
          f"{args.calls}`: backend CPU µs per call, {args.calls} calls of each, interleaved\n")
    print("| function | median | p25 | p75 | mean of the middle 80 % |")
    print("|---|---:|---:|---:|---:|")
    for name, values in spent.items():
        values.sort()
        n = len(values)
        print(f"| {name} | {values[n // 2]:.0f} | {values[n // 4]:.0f} | "
              f"{values[3 * n // 4]:.0f} | {statistics.mean(values[n // 10:n - n // 10]):.0f} |")


if __name__ == "__main__":
    main()
