"""Offline judgement under churn: "nothing acknowledged is ever lost", checked end to end.

    python -m bench.churn [--count 1500] [--seconds S] [--workers 2] [--kill 0.15]
                          [--outage 0 [--outage-at 5]] [--kill9] [--runs 1] [--portals 4]
                          [--seed 9]

Per run, on an embedded PostgreSQL in a temporary directory: the simulated portals' installs
are allowed, `ledger serve --workers N` starts (127.0.0.1, a free port), and three senders post
the *same* simulated corpus (installs, uninstalls, reinstalls: token churn) at once, each in
order with 16 in flight, while a killer `pg_terminate_backend()`s a random ledger backend every
`--kill` seconds (0: none) and an operator runs `ledger portals allow` ten times. `--outage S`
also stops PostgreSQL for S seconds in the middle of the sending (a full outage: every worker
spools and judges offline); `--kill9` kills one worker with SIGKILL a second after that
(serve starts a replacement, which drains the dead one's spool). After the spools drained (and
again after SIGTERM):

    acked-but-missing   answered 200/202, body never stored — MUST be 0
    positions-disagree  one body answered with different positions — MUST be 0
    refused-but-stored  answered 4xx though that body's original is stored: an inaccurate
                        answer (e.g. offline, no dedup facts), not a loss
    never-stored        distinct bodies of the corpus no copy of which was stored (all three
                        refused, e.g. on an overtaken lifecycle: a genuine delivery lost)
    refused-on-drain    ERROR lines "answered 202 during an outage was refused on drain"

and which event types the refused-but-stored answers (with their status) and the never-stored
bodies were. Each never-stored body is classified by its copies' send and answer times against
its portal's lifecycle (`timeline`): the senders race their own lifecycle (16 in flight, three
copies of everything) where real Bitrix24 does not, so the headline line counts only the
never-stored bodies the service could have stored (`SERVICE_KINDS`).

Exits 1 when acked-but-missing or positions-disagree is non-zero in any run. Each run's serve
log is kept as bench/out/churn-serve-<time>-<run>-<pid>.log (an outage logs asyncpg's pool
tracebacks; run with LEDGER_LOG_LEVEL=DEBUG for one line per lifecycle judgement).
Bounded: --seconds caps the sending, the drain wait is 90 s; nothing but 127.0.0.1 and the
temporary socket is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.chaos import postgres
from bench.common import OUT
from ledger import embedded, migrations, wire
from ledger.envelope import INSTALL
from ledger.operations import change_trust
from ledger.settings import TrustPolicy
from ledger.simulation import Traffic
from ledger.storage.store import EventStore, create_pool
from ledger.storage.target import with_login
from ledger.trust import TrustChange

SENDERS = 3
# never-stored kinds the service could have stored (`timeline`): the headline counts these
SERVICE_KINDS = ("misjudged", "in-doubt")
IN_FLIGHT = 16
DRAIN_SECONDS = 90.0
REFUSED_ON_DRAIN = "answered 202 during an outage was refused on drain"


@dataclass(slots=True)
class Answer:
    sender: int
    index: int
    sha: str
    status: int  # -1: never answered
    body: dict[str, Any]
    sent: float = 0.0  # monotonic seconds: when the request went out and its answer came
    answered: float = 0.0


@dataclass(slots=True)
class Counts:
    acked_missing: int = 0
    disagree: int = 0
    refused_stored: int = 0
    never_stored: int = 0
    events: int = 0
    examples: list[str] = field(default_factory=list)
    refused_by: Counter[str] = field(default_factory=Counter)  # "EVENT status"
    never_by: Counter[str] = field(default_factory=Counter)
    stored: set[str] = field(default_factory=set)  # body digests stored

    def line(self) -> str:
        return (f"acked-but-missing {self.acked_missing}, positions-disagree {self.disagree}, "
                f"refused-but-stored {self.refused_stored}, never-stored {self.never_stored} "
                f"({self.events} events)")

    def kinds(self) -> str:
        def top(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {n}" for k, n in counter.most_common(6)) or "none"
        return f"refused-but-stored: {top(self.refused_by)}; never-stored: {top(self.never_by)}"


def corpus(count: int, portals: int, seed: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """(url query, body) per delivery, and the member ids of every install in it (one
    allowance each, as `ledger simulate --provision` grants)."""
    traffic = Traffic(seed=seed, portals=portals)
    deliveries, installs = [], []
    for _ in range(count):
        delivery = traffic.next()
        deliveries.append((delivery.query, wire.http_build_query(delivery.document)))
        if delivery.document["event"] == INSTALL:
            installs.append(delivery.portal.member_id)
    return deliveries, installs


def event_of(body: bytes) -> str:
    document = wire.parse_php_form(body, max_fields=10_000, max_nesting=32)
    return str(document.get("event", "?"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def allow(dsn: str, member_ids: list[str]) -> None:
    pool = await create_pool(dsn, size=2)
    try:
        store = EventStore(pool, policy=TrustPolicy.ALLOWLIST)
        for member_id in member_ids:
            await change_trust(store, TrustChange.ALLOWED, member_id=member_id, actor="bench")
    finally:
        await pool.close()


async def send(url: str, deliveries: list[tuple[str, bytes]], sender: int, answers: list[Answer],
               until: float) -> None:
    """One sender: the whole corpus in order, IN_FLIGHT at a time, a few retries on a refused
    connection (a killed worker is being replaced)."""
    gate = asyncio.Semaphore(IN_FLIGHT)
    async with aiohttp.ClientSession() as session:
        async def one(index: int, query: str, body: bytes) -> None:
            async with gate:
                if time.monotonic() > until:
                    return
                sha = hashlib.sha256(body).hexdigest()
                target = url + (f"?{query}" if query else "")
                for _ in range(5):
                    sent = time.monotonic()
                    try:
                        async with session.post(target, data=body,
                                                headers={"Content-Type": wire.FORM}) as response:
                            try:
                                document = await response.json(content_type=None)
                            except ValueError:
                                document = {}
                            answers.append(Answer(sender, index, sha, response.status,
                                                  document if isinstance(document, dict) else {},
                                                  sent, time.monotonic()))
                            return
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
                answers.append(Answer(sender, index, sha, -1, {}))
        await asyncio.gather(*(one(i, q, b) for i, (q, b) in enumerate(deliveries)))


async def killer(admin: str, every: float, stop: asyncio.Event, kills: Counter[str]) -> None:
    """Terminate a random ledger backend every `every` seconds (reconnecting after outages)."""
    chooser = random.Random(7)
    connection: asyncpg.Connection | None = None
    while not stop.is_set():
        await asyncio.sleep(every)
        try:
            if connection is None or connection.is_closed():
                connection = await asyncpg.connect(admin, timeout=2)
            rows = await connection.fetch(
                "SELECT pid, left(query, 20) AS q FROM pg_stat_activity "
                "WHERE application_name = 'ledger' AND pid <> pg_backend_pid()")
            if rows:
                row = chooser.choice(rows)
                await connection.execute("SELECT pg_terminate_backend($1)", row["pid"])
                kills[row["q"] or "?"] += 1
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError, TimeoutError):  # a fault mid-kill: reconnect
            if connection is not None:
                connection.terminate()
            connection = None
    if connection is not None:
        await connection.close()


async def operator(dsn: str, env: dict[str, str], errors: list[str]) -> None:
    """`ledger portals allow` ten times while the senders run (unknown portals)."""
    for n in range(10):
        member_id = f"{random.getrandbits(120):030x}{n:02x}"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledger", "portals", "allow", "--member-id", member_id,
            env={**env, "LEDGER_DATABASE_URL": dsn}, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, stderr = await process.communicate()
        if process.returncode:
            errors.append(stderr.decode(errors="replace").strip()[-160:])


async def outage(handle: embedded.EmbeddedHandle, after: float, seconds: float,
                 notes: list[str]) -> None:
    await asyncio.sleep(after)
    await asyncio.to_thread(postgres, handle, "stop")
    notes.append(f"PostgreSQL stopped at {after:.1f}s for {seconds:g}s")
    await asyncio.sleep(seconds)
    await asyncio.to_thread(postgres, handle, "start")


def worker_pids(serve: int) -> list[int]:
    """`ledger serve`'s worker processes (spawned by multiprocessing), from /proc."""
    try:
        children = Path(f"/proc/{serve}/task/{serve}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            found.append(int(child))
    return found


async def kill_worker(serve: int, after: float, notes: list[str]) -> None:
    """kill -9 one worker `after` seconds in (`serve` starts a replacement)."""
    await asyncio.sleep(after)
    pids = worker_pids(serve)
    if pids:
        victim = random.choice(pids)
        os.kill(victim, signal.SIGKILL)
        notes.append(f"worker pid {victim} killed -9 at {after:.1f}s")


def spools_drained(data: Path) -> bool:
    """Every worker's spool is drained (read-only: sizes against the drained markers)."""
    for directory in (data / "spool").glob("worker-*"):
        log_file, marker = directory / "spool.log", directory / "drained"
        size = log_file.stat().st_size if log_file.exists() else 0
        try:
            drained = int(marker.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            drained = 0
        if size > drained:
            return False
    return True


async def wait_drained(data: Path) -> bool:
    """Until every spool is drained, or DRAIN_SECONDS passed (answers whether it drained)."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while not spools_drained(data):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)  # polling files another process writes: nothing to await
    return True


async def check(admin: str, answers: list[Answer], deliveries: list[tuple[str, bytes]],
                ) -> Counts:
    connection = await asyncpg.connect(admin)
    try:
        stored = {bytes(r["body_sha256"]).hex(): r["position"] for r in await connection.fetch(
            "SELECT body_sha256, position FROM ledger.events WHERE body_sha256 IS NOT NULL")}
        events = await connection.fetchval("SELECT count(*) FROM ledger.events")
    finally:
        await connection.close()
    counts = Counts(events=events, stored=set(stored))
    positions: dict[str, set[int]] = defaultdict(set)
    for answer in answers:
        if answer.status in (200, 202):
            if answer.sha not in stored:
                counts.acked_missing += 1
                if len(counts.examples) < 5:
                    counts.examples.append(f"#{answer.index} {answer.status} {answer.body}")
            if answer.body.get("position") is not None:
                positions[answer.sha].add(answer.body["position"])
        elif answer.sha in stored:
            counts.refused_stored += 1
            counts.refused_by[f"{event_of(deliveries[answer.index][1])} {answer.status}"] += 1
    never = {a.sha: a.index for a in answers if a.sha not in stored}
    counts.never_stored = len(never)
    counts.never_by.update(event_of(deliveries[i][1]) for i in never.values())
    counts.disagree = sum(1 for sha, p in positions.items()
                          if len(p) > 1 or (sha in stored and p != {stored[sha]}))
    return counts


def lifecycle_of(body: bytes) -> tuple[str, str]:
    document = wire.parse_php_form(body, max_fields=10_000, max_nesting=32)
    auth = document.get("auth")
    member_id = auth.get("member_id", "?") if isinstance(auth, dict) else "?"
    return str(document.get("event", "?")), str(member_id)


def timeline(answers: list[Answer], deliveries: list[tuple[str, bytes]], stored: set[str],
             began: float) -> tuple[Counter[str], list[str]]:
    """Every never-stored delivery, classified against its portal's lifecycle in the corpus by
    its copies' send and answer times. A copy is *fair* when real Bitrix24 could have sent it
    so — after the portal's previous install or uninstall (the one whose token it carries, or
    the uninstall before a reinstall) was acknowledged, and answered before any copy of a later
    one was sent (Bitrix24 sends a portal's events in order and does not race its own
    lifecycle; these senders have 16 in flight each and send every delivery three times):

        raced            no copy was fair: refusing it is right (a message ahead of its
                         install, an install ahead of the uninstall before it, or in flight
                         with the portal's next install or uninstall)
        behind-<kind>    its previous lifecycle event was itself never stored; <kind> is that
                         one's (a message under a reinstall that was lost)
        acked            a copy was answered 2xx: an acked-but-missing one (above), not a
                         judgement
        unanswered       no copy, or no fair copy, was answered (`ledger serve` exited: see its
                         log)
        in-doubt         every fair copy was answered 503 lifecycle_in_doubt (or every copy
                         sent after the previous one was acknowledged: a 503 does not depend
                         on what else is in flight)
        misjudged        a fair copy was refused: the service judged it wrongly

    misjudged and in-doubt (and behind- either) are what the service could have stored."""
    by_index: dict[int, list[Answer]] = defaultdict(list)
    for answer in answers:
        by_index[answer.index].append(answer)
    facts = [lifecycle_of(body) for _, body in deliveries]
    kinds: Counter[str] = Counter()
    lines: list[str] = []
    kind_of: dict[int, str] = {}

    def first_ack(index: int | None) -> float | None:
        if index is None:
            return None
        acked = [a.answered for a in by_index.get(index, []) if a.status in (200, 202)]
        return min(acked) if acked else None

    def first_sent_acked(index: int) -> tuple[float, float]:
        copies = by_index.get(index, [])
        return (round(min((a.sent for a in copies), default=began) - began, 3),
                round((first_ack(index) or began) - began, 3))

    def show(a: Answer) -> str:
        return (f"s{a.sender} sent {a.sent - began:.3f} answered {a.answered - began:.3f} "
                f"{a.status} {a.body.get('error') or a.body.get('status')}")

    for index, copies in sorted(by_index.items()):
        if copies[0].sha in stored:
            continue
        event, member_id = facts[index]
        lifecycle = [j for j, (e, m) in enumerate(facts)
                     if m == member_id and e in (INSTALL, "ONAPPUNINSTALL")]
        before = max((j for j in lifecycle if j < index), default=None)
        later = [j for j in lifecycle if j > index]
        if any(a.status in (200, 202) for a in copies):
            kind = "acked"  # counted as acked-but-missing (a serve that exited left it spooled)
        elif all(a.status == -1 for a in copies):
            kind = "unanswered"
        elif before is not None and before in kind_of:
            kind = "behind-" + kind_of[before].removeprefix("behind-")
        else:
            # the portal moves on once any copy of a later install or uninstall is in flight
            sends = [a.sent for j in later for a in by_index.get(j, [])]
            previous, moved_on = first_ack(before), min(sends, default=None)
            after = [a for a in copies if before is None or (previous is not None
                                                             and a.sent > previous)]
            fair = [a for a in after if moved_on is None or a.answered < moved_on]
            kind = ("in-doubt" if after and all(a.status == 503 for a in after)
                    else "raced" if not fair
                    else "unanswered" if all(a.status == -1 for a in fair)
                    else "in-doubt" if all(a.status == 503 for a in fair) else "misjudged")
        kind_of[index] = kind
        kinds[kind] += 1
        if kind.startswith("behind-") and event != INSTALL:
            continue
        lines.append(f"    never-stored {event} #{index} ({member_id[:8]}): {kind}; previous "
                     f"lifecycle #{before} acknowledged at "
                     f"{(first_ack(before) or began) - began:.3f}; later ones (first sent, "
                     f"acknowledged) {[(j, *first_sent_acked(j)) for j in later[:3]]}")
        if before is not None:
            lines.extend(f"      {facts[before][0][5:]:<12} #{before} {show(a)}"
                         for a in by_index.get(before, []))
        lines.extend(f"      {event[5:]:<12} #{index} {show(a)}" for a in copies)
    return kinds, lines


async def one_run(number: int, args: argparse.Namespace) -> bool:
    deliveries, installs = corpus(args.count, args.portals, args.seed)
    root = Path(tempfile.mkdtemp(prefix="ledger-churn-"))
    handle = embedded.start(root / "pg")
    admin_postgres = handle.dsn("postgres")
    connection = await asyncpg.connect(admin_postgres)
    await connection.execute('CREATE DATABASE "ledger"')
    await connection.close()
    admin = with_login(admin_postgres, database="ledger")
    await asyncio.to_thread(migrations.upgrade, admin)
    dsn = with_login(admin_postgres, database="ledger", user="ledger_app")
    await allow(dsn, installs)
    port = free_port()
    env = {**os.environ, "LEDGER_DATABASE_URL": dsn, "LEDGER_DATA_DIR": str(root / "data"),
           "LEDGER_HOST": "127.0.0.1"}
    log_path = root / "serve.log"
    with log_path.open("wb") as log:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ledger", "serve", "--workers", str(args.workers),
            "--port", str(port), env=env, stdout=log, stderr=log)
    ok = False
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                if server.returncode is not None or time.monotonic() > deadline:
                    raise SystemExit(f"ledger serve did not become ready; see {log_path}")
                try:
                    async with session.get(f"{base}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        answers: list[Answer] = []
        kills: Counter[str] = Counter()
        notes: list[str] = []
        cli_errors: list[str] = []
        stop = asyncio.Event()
        began, began_wall = time.monotonic(), time.time()
        until = began + (args.seconds or 1e9)
        side = [asyncio.create_task(operator(dsn, env, cli_errors))]
        if args.kill > 0:
            side.append(asyncio.create_task(killer(admin, args.kill, stop, kills)))
        if args.outage > 0:
            side.append(asyncio.create_task(outage(handle, args.outage_at, args.outage, notes)))
        if args.kill9:
            side.append(asyncio.create_task(kill_worker(server.pid, args.outage_at + 1, notes)))
        await asyncio.gather(*(send(f"{base}/bitrix24/events", deliveries, k, answers, until)
                               for k in range(SENDERS)))
        sent_seconds = time.monotonic() - began
        stop.set()
        await asyncio.gather(*side)
        drained = await wait_drained(root / "data")
        before = await check(admin, answers, deliveries)
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(server.wait(), 120)  # non-zero: see its log
        after = await check(admin, answers, deliveries)
        text = log_path.read_text(errors="replace")
        statuses = Counter(a.status for a in answers)
        print(f"run {number}: {len(answers)} answers in {sent_seconds:.0f} s "
              f"{dict(sorted(statuses.items()))}; kills {sum(kills.values())}; "
              f"{'; '.join(notes) or 'no outage'}; spools drained: {drained}")
        print(f"  before SIGTERM: {before.line()}")
        print(f"  after SIGTERM (exit {exit_code}): {after.line()}; refused-on-drain "
              f"{text.count(REFUSED_ON_DRAIN)}; Tracebacks {text.count('Traceback')}; "
              f"operator errors {len(cli_errors)}")
        print(f"  {after.kinds()}")
        if exit_code or not drained:
            print(f"  ledger serve exited early or left its spools undrained (exit {exit_code}, "
                  f"drained {drained}): this run's counts are of a dead service, not of judging")
        OUT.mkdir(parents=True, exist_ok=True)
        dump = OUT / f"churn-answers-{time.strftime('%H%M%S')}-{number}-{os.getpid()}.json"
        dump.write_bytes(orjson.dumps({
            "seed": args.seed, "count": args.count, "portals": args.portals, "began": began,
            "stored": sorted(after.stored), "answers": [
                [a.sender, a.index, a.sha, a.status, a.body, a.sent, a.answered]
                for a in answers]}))
        kinds, lines = timeline(answers, deliveries, after.stored, began)
        if kinds:
            service = sum(n for kind, n in kinds.items()
                          if kind.removeprefix("behind-") in SERVICE_KINDS)
            print(f"  never-stored the service could have stored: {service} of "
                  f"{after.never_stored} ({dict(kinds)}); times below from "
                  f"{time.strftime('%H:%M:%S', time.localtime(began_wall))}"
                  f"{f'{began_wall % 1:.3f}'[1:]} (the serve log's clock)")
            print("\n".join(lines[:60]))
        for example in after.examples:
            print(f"    missing: {example}")
        ok = after.acked_missing == 0 and after.disagree == 0 and before.disagree == 0
    finally:
        if server.returncode is None:
            server.kill()
            await server.wait()
        OUT.mkdir(parents=True, exist_ok=True)
        kept = OUT / f"churn-serve-{time.strftime('%H%M%S')}-{number}-{os.getpid()}.log"
        shutil.copy(log_path, kept)
        print(f"  serve log kept in {kept}")
        handle.server.stop()
        shutil.rmtree(root, ignore_errors=True)
    return ok


def classify(path: str) -> None:
    """Classify a run's never-stored bodies again from its answers file."""
    saved = orjson.loads(Path(path).read_bytes())
    deliveries, _ = corpus(saved["count"], saved["portals"], saved["seed"])
    answers = [Answer(*row) for row in saved["answers"]]
    kinds, lines = timeline(answers, deliveries, set(saved["stored"]), saved["began"])
    print(dict(kinds))
    print("\n".join(lines))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--classify":
        classify(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1500, help="deliveries in the corpus")
    parser.add_argument("--seconds", type=float, default=0, help="cap the sending (0: none)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill", type=float, default=0.15,
                        help="seconds between backend kills (0: none)")
    parser.add_argument("--outage", type=float, default=0,
                        help="stop PostgreSQL this many seconds mid-run (0: none)")
    parser.add_argument("--outage-at", type=float, default=5, help="seconds into the sending")
    parser.add_argument("--kill9", action="store_true",
                        help="kill -9 one worker a second after --outage-at (mid-outage)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--portals", type=int, default=4)
    parser.add_argument("--seed", type=int, default=9)
    args = parser.parse_args()
    failed = [n for n in range(1, args.runs + 1) if not asyncio.run(one_run(n, args))]
    if failed:
        print(f"FAILED: runs {failed} lost acknowledged deliveries or disagreed on positions")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
