"""Trust while PostgreSQL is away: judged by the same planner, on state every worker shares.

The state a worker judges by offline is

    base        the trust state as last read from PostgreSQL (all portals, open allowances)
                at the position of the last trust event read — refreshed every
                LEDGER_TRUST_REFRESH_SECONDS while serving, so a portal provisioned with
                `ledger portals trust` is known in a later outage; saved (0600) to
                `<trust_dir>/snapshot.json` so a restart during an outage has it;
  + own         trust changes this worker committed since (until a refresh covers them);
  + journal     the trust effects of lifecycle deliveries spooled by *any* worker and not yet in
                PostgreSQL, in the order they were spooled: `<trust_dir>/journal.log`, one JSON
                line each, appended under an exclusive `flock` and fsync'd.

What is committed (own, and the journal's settled entries: other workers' shared commits and
drained spooled entries) applies in PostgreSQL's order, by position; then what is not yet.

`spool()` plans a batch offline (`ledger.planner.plan` with no head) on that state, writes the
spool records and then the batch's trust effects to the journal — all under the journal's lock,
so every worker's offline decisions follow one order. A portal with journal entries not yet
settled is *provisional*. The planner also gets the dedup facts this worker has of its own
recent commits (`ledger.recent`, in memory, bounded): a redelivery of one of them is answered as
the duplicate it is (200, its position), as online, and moves no trust — not refused because
its portal's trust moved since, and not (an install's copy after an uninstall) accepted as a new
establishment taking the allowance of the genuine reinstall. It is still spooled, so the drain
records the redelivery as online would. So is the copy of a delivery this worker spooled as
accepted and has not drained (`Facts.spooled`, `Plan.copies`): answered 202 as its original
was, spooled as judged like it, changing no trust; the drain stores the original first.
A lifecycle delivery another worker spooled and has not drained (an open journal entry's cause)
is known so too (`_spooled_elsewhere`): its copy here is a copy, moving no trust.
Installs and uninstalls are shared: the worker that commits one writes it, as stored, beside its
trust change into the journal (`_share`), so a copy reaching another worker offline is a
duplicate there too while the journal holds it. Whatever else other workers stored or spooled,
or this one before a restart or beyond the cache's bounds, is judged as before: as a new
delivery.

What the offline judge refuses is refused at once, as online: a sender is never told 202 for what
the drain would refuse on the same trust. Each spooled draft records the journal's length
(`offline_seen`); on drain it waits until every other worker's entry for its portal before that
point has drained (`drainable`), so a delivery that depends on another worker's spooled uninstall
or reinstall is drained after it. Lifecycle deliveries are judged again on drain by PostgreSQL's
trust, in journal order; an acceptance on provisional trust is stored as judged when every entry
it depended on reached PostgreSQL (`held`) — else (an entry was refused: the offline state was
stale, e.g. a restart during an outage with an old snapshot) it is judged again and PostgreSQL's
trust wins, with an ERROR line. A worker that is online meanwhile judges a portal with another
worker's undrained entries only after them (`Appender._after_other_workers`: it
spools behind them), never ahead of them by PostgreSQL's trust. An online append of installs or
uninstalls holds the journal from its head lock until it has shared what it committed
(`JournalTurn`): offline judgement by another worker never falls between its COMMIT and its
share, and an entry spooled after its early check is still seen, under the lock. Such an append
given up on (the append timeout), cut off or killed while its COMMIT was in flight may have
committed or not. Judged, before its COMMIT, it writes its intent (`_intend`, only when its
plan changes trust: the deliveries whose trust changes it commits, and its transaction — id,
backend pid and start), resolved by its share; given up on, its worker keeps
the journal locked until the batch is spooled, which records *in doubt* its portals whose trust
its COMMIT may move (`Doubt`; `JournalTurn.committing`: a refused install moves none).
Offline every worker answers their installs and uninstalls 503 (LifecycleInDoubt) — every
delivery of theirs, when nothing spooled stands for the doubtful ones — until the doubt is
settled: by the drain of that worker's spool (its own, or, its number no longer running, the
adopting worker's: `ledger.adoption`), or by any worker that reaches PostgreSQL
(`settle_doubts`: the transaction over, or ended, what it committed is what PostgreSQL holds of
its deliveries). One
given up on before its COMMIT is stopped there (rolled back; its spool resolves the intent).
After a drain the worker settles its own entries with the position their trust event got — or
as refused, and a refused entry no longer counts anywhere: provisional state never outlives its
refusal. The snapshot only ever holds what PostgreSQL held.
All of it is of one history: a refresh first checks the database still has the events head last
read and the one this worker's last commit ended at; after a failover to a replica that lost
commits, or a restore, it forgets the dedup facts and own changes, reloads the base, and marks the
journal so that no worker applies what was settled before (`_rewind`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, TypeVar

import orjson

from ledger.envelope import INSTALL, UNINSTALL
from ledger.errors import (
    DatabaseUnavailable,
    LedgerError,
    LifecycleInDoubt,
    LifecycleNotDrained,
    LockWaitTimeout,
)
from ledger.models import (
    Draft,
    Duplicate,
    EventDraft,
    FoundStored,
    Outcome,
    Refusal,
    RejectionDraft,
    Spooled,
    Stored,
    Transaction,
)
from ledger.planner import Committed, Facts, PlannedEffect, plan
from ledger.recent import RecentCommits
from ledger.settings import TrustPolicy
from ledger.spool import any_pending
from ledger.storage.store import EventStore
from ledger.trust import (
    Allowance,
    PortalTrust,
    TrustEffect,
    TrustFacts,
    TrustState,
    apply,
    effect_of,
)

log = logging.getLogger(__name__)

# the deliveries whose commit moves a portal's trust (`JournalTurn`)
_LIFECYCLE = frozenset({INSTALL, UNINSTALL})
_T = TypeVar("_T")
# an online append of lifecycle deliveries given up on while it may yet commit: the journal,
# still locked by its turn, the turn's portals and its transaction (`JournalTurn.give_up`,
# `OfflineTrust.spool`); no portals: given up on before its COMMIT, its intent to be resolved
Doubt = tuple[IO[bytes], frozenset[str], Transaction | None]
# a doubt's key: the worker that recorded it, the portal and the delivery's dedup key (hex)
_DoubtKey = tuple[int, str, str]
_COMPACT_AFTER_SECONDS = 60.0  # settled entries stay this long for workers yet to refresh
# how long a worker settling a doubt waits for the backend of a transaction it ends
_END_WAIT_MS = 500
# repeated 503 lifecycle_in_doubt answers for one portal: one WARNING line this often at most
_DOUBT_REPEAT_LOG_SECONDS = 10.0
# bad journal lines already logged by this process (`_passed_over`), by their digest
_REPORTED_LINES: set[bytes] = set()
_REPORTED_LINES_MAX = 1024
# how long a thread waits for the journal's lock before giving up (`LockWaitTimeout`): longer
# than any holder keeps it (an online lifecycle append's turn lasts up to the append timeout,
# 5 s by default, then its spool), short enough that a stalled holder (a stopped process, a
# hung disk) costs each waiter this long once, not a thread for ever
LOCK_WAIT_SECONDS = 10.0
_LOCK_POLL_SECONDS = (0.001, 0.05)  # the first and the longest pause between two tries


@dataclass(frozen=True, slots=True)
class _Entry:
    seq: int
    worker: int
    member_id: str
    cause: str  # dedup key (hex) of the spooled delivery that made the change
    effect: TrustEffect
    # a committed change a Bitrix24 delivery caused (`_share`): that delivery, as stored — its
    # dedup key, position and the token digest it was accepted under (`Plan.committed`)
    stored: Committed | None = None


@dataclass(slots=True)
class _Journal:
    entries: list[_Entry]
    settled: dict[int, int | None]  # seq -> position of its trust event (None: refused)
    settled_at: float
    next_seq: int
    floor: int = 0  # entries below this sequence number were compacted away
    # entries below this sequence number were committed, if at all, in a history PostgreSQL
    # went back from (a worker found it: `OfflineTrust.refresh`): their settlements and shared
    # dedup facts are not the database's — only what a refresh reads from it counts
    rewound: int = 0
    lines: int = 0  # lines read (`_compact`: a journal of one line has nothing to empty)
    # lifecycle deliveries whose online append may have committed unseen (its intent before
    # the COMMIT, then given up on, cut off mid-COMMIT, or its worker killed there), not yet
    # settled: (worker, member_id, cause) -> the transaction (None: recorded without it) —
    # their portals' installs and uninstalls are judged by nobody offline meanwhile (`spool`)
    doubts: dict[_DoubtKey, Transaction | None] = field(default_factory=dict)

    def doubted(self, *, besides: Transaction | None = None) -> frozenset[str]:
        """Portals in doubt (`besides`: not counting this transaction's own doubt)."""
        return frozenset(member_id for (_, member_id, _), transaction in self.doubts.items()
                         if besides is None or transaction != besides)

    def bare(self, *, besides: Transaction | None = None) -> frozenset[str]:
        """Portals in doubt with no journal entry standing for the doubtful delivery (its
        worker was killed mid-COMMIT, or its spool write failed): nothing of theirs can be
        judged offline — a delivery under a token the doubtful uninstall may have ended would
        be answered 202."""
        causes = {(e.member_id, e.cause) for e in self.entries}
        return frozenset(member_id for (_, member_id, cause), transaction in self.doubts.items()
                         if (besides is None or transaction != besides)
                         and (member_id, cause) not in causes)


class OfflineTrust:
    """One worker's view of trust for outages. Its file methods block: call them in a thread."""

    def __init__(self, directory: Path, *, worker: int, policy: TrustPolicy,
                 recent: RecentCommits | None = None) -> None:
        """`recent`: this worker's own recent commits, for judging redeliveries offline (none:
        every delivery is judged as new offline)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._directory = directory
        self._journal_path = directory / "journal.log"
        self._snapshot_path = directory / "snapshot.json"
        self._worker = worker
        self._policy = policy
        self.recent = recent if recent is not None else RecentCommits(max_entries=0,
                                                                       max_bytes=0)
        # what this worker spooled as accepted and has not drained: the token digest it
        # presented and whether its acceptance was final (`offline_accepted`); bounded as the
        # cache is, in memory (after a restart its copies are judged as new deliveries)
        self._pending: dict[tuple[str, bytes], tuple[bytes | None, bool]] = {}
        self._pending_limit = self.recent.capacity
        # the base, the position it was read at, and this worker's own committed changes past
        # it: one value, replaced whole, because offline judging and snapshot saving read it
        # in threads while the loop refreshes it (a base read before a refresh with the
        # position read after it skipped the journal's changes in between: a portal judged
        # without a committed uninstall or reinstall)
        self._state: tuple[TrustFacts, int, tuple[tuple[int, TrustEffect], ...]] = (
            TrustFacts(), 0, ())
        self.refreshed = asyncio.Event()  # set whenever a refresh read new trust events
        # portals with other workers' unsettled journal entries, as of the journal's stat
        self._elsewhere: frozenset[str] = frozenset()
        self._elsewhere_key: tuple[int, int, int] | None = None
        # the events head (position, chain hash) read after the base last was, and the head
        # the store last saw that a refresh found in PostgreSQL: what this state was learned in
        self._history: tuple[int, bytes] | None = None
        self._verified: tuple[int, bytes] | None = None
        # portals in doubt as of the journal's stat (`doubted`), cached as `_elsewhere` is
        self._doubted: frozenset[str] = frozenset()
        # monotonic time `settle_doubts` last left a doubt unsettled
        self._settle_tried = -float("inf")
        # doubts `settle_doubts` could not ask PostgreSQL about, logged once (`_unanswerable`)
        self._unanswered: set[Transaction] = set()
        # per portal answered 503 lifecycle_in_doubt: the doubt, when it was last logged, and
        # how many answers since (`_report_doubt`); only portals in doubt (bounded)
        self._reported: dict[str, tuple[frozenset[tuple[int, str, Transaction | None]], float,
                                        int]] = {}

    # ---- the base, from PostgreSQL -----------------------------------------------------

    @property
    def base(self) -> TrustFacts:
        return self._state[0]

    @property
    def base_position(self) -> int:
        return self._state[1]

    def _rebase(self, base: TrustFacts, position: int, *, keep_own: bool = True) -> None:
        own = tuple(o for o in self._state[2] if o[0] > position) if keep_own else ()
        self._state = (base, position, own)

    async def start(self, store: EventStore) -> None:
        """Load the base from PostgreSQL; when it is unreachable, from the saved snapshot."""
        try:
            self._rebase(*await store.load_trust())
            self._history = await store.head()
        except LedgerError as exc:
            loaded = self._load_snapshot()
            if loaded is None:
                log.error("no trust known while PostgreSQL is unreachable (%s): only installs "
                          "can be judged until it is back", exc)
                return
            self._rebase(*loaded)
            log.warning("PostgreSQL unreachable: judging deliveries by the trust saved in %s "
                        "(position %d)", self._snapshot_path, self.base_position)
            return
        await asyncio.to_thread(self._save_snapshot)

    async def refresh(self, store: EventStore) -> None:
        """Fold the trust events committed anywhere since the base; raises LedgerError when
        PostgreSQL is away (the state then stays as it is). First checks that the database
        still holds the history this state was learned in (`_same_history`)."""
        if not await self._same_history(store):
            await self._rewind(store)
            return
        read, read_position, _ = self._state
        events = await store.trust_events_since(read_position)
        self._history = await store.head()  # after the read: it covers what was read
        if not events:
            await asyncio.to_thread(self._compact)
            return
        base = read.copy()
        for position, payload in events:
            effect = effect_of(payload)
            if effect is not None:
                apply(base, effect, position)
        self._rebase(base, events[-1][0])
        await asyncio.to_thread(self._persist)
        self.refreshed.set()

    def _persist(self) -> None:
        self._save_snapshot()
        self._compact()

    async def _same_history(self, store: EventStore) -> bool:
        """Whether PostgreSQL still has the events head last read here and the head this
        worker's store last saw (its own commits lie at or before it): a failover to a replica
        that lost the last commits, or a restore, has another event there or none. The chain
        hash commits to every event before it, so one look each suffices."""
        last = store.last_head
        for head in (self._history, last if last != self._verified else None):
            if head is not None and not await store.holds(*head):
                self._verified = last
                return False
        self._verified = last
        return True

    async def _rewind(self, store: EventStore) -> None:
        """PostgreSQL went back in history under this worker: what it knew of the lost part
        must not answer anyone offline — a 200 duplicate for a delivery the database no longer
        holds, a 202 under a token only the lost history trusted (stored as judged on drain).
        Forgets its recent commits and own changes, reloads the base, and marks the journal so
        every worker stops applying the entries settled before (`_Journal.rewound`)."""
        log.warning("PostgreSQL does not hold the history this worker last saw (a failover to "
                    "a replica that lost the last commits, or a restore): offline dedup facts "
                    "forgotten, trust reloaded from the database")
        self.recent.forget_all()
        self._rebase(*await store.load_trust(), keep_own=False)
        self._history = await store.head()
        await asyncio.to_thread(self._mark_rewound)
        self.refreshed.set()

    def _mark_rewound(self) -> None:
        with self._locked(fcntl.LOCK_EX) as handle:
            journal = _read(handle)
            _append(handle, [{"rewound": journal.next_seq, "at": time.time()}])
        self._save_snapshot(replace_newer=True)

    def remember(self, committed: Sequence[Committed]) -> None:
        """The Bitrix24 deliveries this worker just stored (appended or drained): a redelivery
        of one during a later outage is a duplicate, as online (`ledger.recent`)."""
        self.recent.remember(committed)

    async def note_committed(self, effects: Sequence[PlannedEffect],
                             causes: Sequence[Committed | None] = (),
                             turn: JournalTurn | None = None) -> None:
        """This worker's own committed trust changes count offline at once (and in the saved
        snapshot: a restart during a later outage knows them), before a refresh. `causes`:
        for each effect, the Bitrix24 delivery that caused it as stored (shared too). `turn`:
        the journal this append holds (`JournalTurn`), shared through before it lets go."""
        if not effects:
            return
        causes = list(causes) or [None] * len(effects)
        committed = [(e.position, e.effect, cause)
                     for e, cause in zip(effects, causes, strict=True) if e.position is not None]
        base, position, own = self._state
        self._state = (base, position,
                       own + tuple((p, effect) for p, effect, _ in committed if p > position))
        if turn is not None and turn.handle is not None:
            intended = turn.intended  # committed: no longer in doubt, said in the same write
            await turn.in_thread(lambda handle: self._share(committed, handle, intended))
            turn.intended = None
            turn.shared = True
            turn.release()  # shared: the snapshot below is this worker's alone
        else:  # no turn, or given up on (`JournalTurn.give_up`): the lock is taken here
            await asyncio.to_thread(self._share, committed)
        await asyncio.to_thread(self._save_snapshot)

    def turn(self, drafts: Sequence[EventDraft]) -> JournalTurn:
        """The journal's turn for an online append of these lifecycle deliveries."""
        return JournalTurn(self, drafts)

    def _intend(self, handle: IO[bytes], keys: list[list[str]],
                transaction: Transaction) -> list[list[str]] | None:
        """Before an online append of lifecycle deliveries sends its COMMIT, the journal says
        they are in doubt, and in which transaction: should the worker be killed mid-COMMIT
        (or its spool refuse the batch given up on), the doubt outlives it and any worker
        reaching PostgreSQL settles it (`settle_doubts`). One fsync'd line an append of
        installs or uninstalls; nobody reads it while the turn holds the journal, and the share
        after the COMMIT resolves it in the same write. None when it could not be written
        (logged: the doubt is then recorded only if the batch is spooled)."""
        try:
            _append(handle, [{"doubt": keys, "worker": self._worker,
                              "txn": transaction.as_json(), "at": time.time()}])
        except OSError as exc:
            log.error("the offline trust journal %s cannot be written (%s): a worker killed "
                      "in this append's COMMIT would leave no doubt behind", self._journal_path,
                      exc)
            return None
        return keys

    def _resolve(self, handle: IO[bytes], keys: list[list[str]]) -> None:
        """Not fsync'd: lost in a crash of the machine, the intent is a doubt a worker settles
        (a lifecycle append that committed nothing new — duplicates — costs no fsync here)."""
        _append(handle, [{"resolved": keys, "worker": self._worker}], durable=False)

    def _open_exclusive(self) -> IO[bytes]:
        handle = self._open_journal()
        try:
            self._flock(handle, fcntl.LOCK_EX)
        except BaseException:
            handle.close()
            raise
        return handle

    def _flock(self, handle: IO[bytes], mode: int) -> None:
        """Take the journal's lock, waiting at most `LOCK_WAIT_SECONDS` — polled, so the thread
        waiting ends then whatever the holder does: a blocking `flock` in a thread nobody can
        stop kept one thread per waiter for as long as a stalled holder held it (each lifecycle
        append given up on left one more). Raises LockWaitTimeout, an outage to the caller."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        pause = _LOCK_POLL_SECONDS[0]
        while True:
            try:
                fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockWaitTimeout(
                    f"the offline trust journal {self._journal_path} stayed locked for "
                    f"{LOCK_WAIT_SECONDS:g} s (a process holding it is stalled: stopped, or on "
                    "a hung disk?); handled as an outage — find the holder (`fuser` on the "
                    "file) and end or resume it")
            time.sleep(min(pause, left))
            pause = min(pause * 2, _LOCK_POLL_SECONDS[1])

    def _waited_on(self, handle: IO[bytes], portals: frozenset[str]) -> frozenset[str]:
        """Of `portals`, those with other workers' journal entries not yet in PostgreSQL."""
        journal = _read(handle)
        return frozenset(e.member_id for e in journal.entries
                         if e.worker != self._worker and e.seq not in journal.settled
                         and e.member_id in portals)

    def _share(self, committed: Sequence[tuple[int, TrustEffect, Committed | None]],
               held: IO[bytes] | None = None, resolved: list[list[str]] | None = None,
               ) -> None:
        """Tell the other workers at once, through the journal (as entries already settled at
        their positions): an outage right after this commit is judged on it by every worker,
        not only once their next refresh has read it from PostgreSQL. With the lifecycle
        delivery that caused it, as stored: a copy of that install or uninstall reaching
        another worker offline is the duplicate it is (`_remembered`), not a new one. `held`:
        the journal, locked already by this append's turn; `resolved`: its intent (`_intend`),
        no longer in doubt."""
        with (contextlib.nullcontext(held) if held is not None
              else self._locked(fcntl.LOCK_EX)) as handle:
            journal = _read(handle)
            lines: list[dict[str, Any]] = []
            for seq, (position, effect, cause) in enumerate(committed, start=journal.next_seq):
                line = {"seq": seq, "worker": self._worker, "member_id": effect.member_id,
                        "cause": "", "effect": effect.as_json()}
                if cause is not None and cause[0] == effect.member_id:
                    line["stored"] = [cause[1].hex(), cause[2],
                                      cause[3].hex() if cause[3] is not None else None]
                lines.append(line)
                lines.append({"settled": seq, "position": position, "at": time.time()})
            if resolved:
                lines.append({"resolved": resolved, "worker": self._worker})
            _append(handle, lines)

    # ---- judging offline ---------------------------------------------------------------

    def spool(self, drafts: Sequence[Draft], write: Callable[[list[Draft]], None], *,
              doubt: Doubt | None = None) -> list[Outcome | LedgerError]:
        """Judge a batch offline, write what is to be spooled with `write`, record its trust
        effects in the journal. `write`'s failure (OSError, SpoolFull) propagates, and then
        nothing reached the journal. An install or uninstall of a portal whose lifecycle is in
        doubt is answered LifecycleInDoubt (503), not judged: the drain judges it again by
        PostgreSQL's trust, which may hold a commit its judgement here did not. (Other
        deliveries are judged on the doubtful batch's spooled entries, which stand for that
        commit as any spooled lifecycle entry does; accepted there, the drain stores them as
        judged — `held`. With no such entry — the doubt's worker was killed mid-COMMIT, or its
        spool refused the batch — none of the portal's deliveries is judged.) `doubt`: this
        batch's own online append may yet commit (`JournalTurn.give_up`) — the journal, still
        locked by its turn, its portals and its transaction: their lifecycle deliveries are
        spooled in doubt (the intent's doubt is this batch's own: not a reason to wait)."""
        held, doubted, transaction = (doubt if doubt is not None
                                      else (None, frozenset[str](), None))
        with (contextlib.closing(held) if held is not None
              else self._locked(fcntl.LOCK_EX)) as handle:
            journal = _read(handle)
            in_doubt = journal.doubted(besides=transaction)
            bare = journal.bare(besides=transaction)

            def waits(draft: Draft) -> bool:
                return isinstance(draft, EventDraft) and (
                    draft.member_id in bare
                    or (draft.event_type in _LIFECYCLE and draft.member_id in in_doubt))

            outcomes = self._judged([d for d in drafts if not waits(d)], write, handle,
                                    journal, doubted, transaction)
            if held is not None and transaction is not None:
                # the intent's deliveries whose portals this batch's COMMIT cannot move: all,
                # when it was given up on before its COMMIT (`JournalTurn.committing`)
                resolved = [[m, c] for (w, m, c), t in journal.doubts.items()
                            if w == self._worker and t == transaction and m not in doubted]
                if resolved:
                    _append(handle, [{"resolved": resolved, "worker": self._worker}])
        answers = iter(outcomes)
        answered: list[Outcome | LedgerError] = []
        for draft in drafts:
            if not waits(draft):
                answered.append(next(answers))
                continue
            assert isinstance(draft, EventDraft)
            self._report_doubt(draft.member_id, journal)
            answered.append(LifecycleInDoubt(
                f"portal {draft.member_id}'s lifecycle is in doubt (a worker's append of its "
                "install or uninstall may have committed: given up on, or cut off or killed "
                "mid-COMMIT) and PostgreSQL is unreachable: not judged, not taken; answered "
                "again once a worker that reaches PostgreSQL has settled it"))
        for member_id in [m for m in self._reported if m not in in_doubt | bare]:
            del self._reported[member_id]  # settled: a new doubt is reported anew
        return answered

    def _report_doubt(self, member_id: str, journal: _Journal) -> None:
        """One ERROR line per doubt (the first delivery it costs), then at most one WARNING
        every `_DOUBT_REPEAT_LOG_SECONDS` per portal counting the others: Bitrix24 does not
        resend a 503, so each is a delivery lost unless pulled back (`event.offline.get`)."""
        doubt = frozenset((w, c, t) for (w, m, c), t in journal.doubts.items()
                          if m == member_id)
        now = time.monotonic()
        seen = self._reported.get(member_id)
        if seen is None or seen[0] != doubt:
            log.error("portal %s's lifecycle is in doubt (worker %s's append of %d install(s) "
                      "or uninstall(s) may have committed) and PostgreSQL is unreachable: its "
                      "installs and uninstalls are answered 503 lifecycle_in_doubt until a "
                      "worker that reaches PostgreSQL settles the doubt (Bitrix24 does not "
                      "resend them: pull them back with event.offline.get)", member_id,
                      ", ".join(sorted({str(w) for w, _, _ in doubt})), len(doubt))
            self._reported[member_id] = (doubt, now, 0)
        elif now - seen[1] >= _DOUBT_REPEAT_LOG_SECONDS:
            log.warning("portal %s's lifecycle still in doubt: %d more deliveries answered 503 "
                        "lifecycle_in_doubt in %.0f s", member_id, seen[2] + 1, now - seen[1])
            self._reported[member_id] = (doubt, now, 0)
        else:
            self._reported[member_id] = (doubt, seen[1], seen[2] + 1)

    def _judged(self, drafts: Sequence[Draft], write: Callable[[list[Draft]], None],
                handle: IO[bytes], journal: _Journal, doubted: frozenset[str],
                transaction: Transaction | None) -> list[Outcome]:
        facts, provisional = self._view(journal)
        wanted = [(d.member_id, d.dedup_key) for d in drafts if isinstance(d, EventDraft)]
        known = _remembered(self.recent, journal, Facts(trust=facts), wanted)
        known.spooled = {k: self._pending[k][0] for k in wanted if k in self._pending}
        _spooled_elsewhere(journal, known, wanted)
        # the originals' flags, taken before `plan` adds this batch's own to `spooled`
        final = {k: self._pending[k][1] for k in known.spooled if k in self._pending}
        planned = plan(drafts, known, None, policy=self._policy,
                       provisional=frozenset(provisional))
        rejections = dict(planned.rejections)
        records: list[Draft] = []
        outcomes: list[Outcome] = []
        spooled: dict[tuple[str, bytes], tuple[bytes | None, bool]] = {}
        stored: set[tuple[str, bytes]] = set()  # found stored: no COMMIT moves their trust
        for index, draft in enumerate(drafts):
            outcome = planned.outcomes[index]
            if index in rejections:
                records.append(rejections[index])
            if isinstance(draft, RejectionDraft):
                outcomes.append(Spooled())
                continue
            assert outcome is not None
            if draft.event_type in _LIFECYCLE and log.isEnabledFor(logging.DEBUG):
                self._log_judgement(draft, outcome, journal, facts)
            key = (draft.member_id, draft.dedup_key)
            if index in planned.copies:
                # judged as its original was: the drain stores that first, and then finds
                # this one stored; if the original is refused there, this one goes its way
                records.append(replace(draft, offline_seen=journal.next_seq,
                                       offline_accepted=final.get(key, False)))
            elif isinstance(outcome, Spooled):
                accepted = index in planned.accepted_offline
                records.append(replace(draft, offline_seen=journal.next_seq,
                                       offline_accepted=accepted))
                final[key] = accepted
                spooled[key] = (draft.presented_sha256, accepted)
            elif isinstance(outcome, Duplicate):
                # stored already: the drain finds it so before judging it, and records the
                # redelivery (`ledger.redeliveries`) as an online duplicate is recorded
                records.append(draft)
                stored.add(key)
            outcomes.append(outcome)
        write(records)
        lines: list[dict[str, Any]] = []
        for seq, made in enumerate(planned.effects, start=journal.next_seq):
            cause = drafts[made.cause]
            assert isinstance(cause, EventDraft)
            lines.append({"seq": seq, "worker": self._worker, "member_id": cause.member_id,
                          "cause": cause.dedup_key.hex(), "effect": made.effect.as_json()})
        # the doubtful append's lifecycle deliveries, spooled: until this worker drains them
        # (then PostgreSQL holds them, or refused them), nobody judges their portals'
        # installs and uninstalls offline. Not one found stored (a redelivery of this
        # worker's commit): its COMMIT moves no trust, and no journal entry stands for it —
        # named, its portal was *bare*, every delivery of it answered 503 (`_Journal.bare`)
        in_doubt = [[d.member_id, d.dedup_key.hex()] for d in records
                    if isinstance(d, EventDraft) and d.event_type in _LIFECYCLE
                    and d.member_id in doubted and (d.member_id, d.dedup_key) not in stored]
        if in_doubt:
            log.warning("an append of %d lifecycle deliveries may have committed (given up "
                        "on, or cut off mid-COMMIT): installs and uninstalls of portal(s) %s "
                        "answered 503 offline until the doubt is settled (drained, or by any "
                        "worker that reaches PostgreSQL)",
                        len({tuple(k) for k in in_doubt}),
                        ", ".join(sorted({m for m, _ in in_doubt})))
            line: dict[str, Any] = {"doubt": in_doubt, "worker": self._worker, "at": time.time()}
            if transaction is not None:
                line["txn"] = transaction.as_json()
            lines.append(line)
        _append(handle, lines)
        for key, value in spooled.items():
            if len(self._pending) < self._pending_limit:
                self._pending[key] = value
        return outcomes

    @property
    def worker(self) -> int:
        return self._worker

    def _log_judgement(self, draft: EventDraft, outcome: Outcome, journal: _Journal,
                       facts: TrustFacts) -> None:
        """One DEBUG line per lifecycle delivery judged offline, with what it was judged on:
        why a reinstall was refused during an outage is answered here."""
        _, base_position, own = self._state
        entries = [(e.seq, e.worker, e.effect.change.value, journal.settled.get(e.seq, "open"))
                   for e in journal.entries if e.member_id == draft.member_id]
        allowances = sorted(a.position for a in facts.allowances.values()
                            if a.member_id == draft.member_id)
        log.debug("offline %s portal=%s key=%s worker=%d base_position=%d own=%s journal=%s "
                  "allowances=%s -> %s", draft.event_type, draft.member_id,
                  draft.dedup_key.hex()[:12], self._worker, base_position, [p for p, _ in own],
                  entries, allowances, getattr(outcome, "code", type(outcome).__name__))

    def drained(self, drafts: Sequence[Draft]) -> None:
        """These spooled drafts left the spool (stored — `recent` has them — refused, or set
        aside): a later copy is no longer the copy of a spooled delivery."""
        for draft in drafts:
            if isinstance(draft, EventDraft):
                self._pending.pop((draft.member_id, draft.dedup_key), None)

    def drainable(self, drafts: Sequence[Draft], *, worker: int | None = None) -> int:
        """How many of these spooled drafts may drain now: a draft waits while another worker's
        journal entry for its portal, made before it was spooled, has not drained. `worker`:
        whose spool they are from (default this one's; another when adopted,
        `ledger.adoption` — then this worker's own entries are another's)."""
        if not any(isinstance(d, EventDraft) and d.offline_seen is not None for d in drafts):
            return len(drafts)
        spooled_by = self._worker if worker is None else worker
        with self._locked(fcntl.LOCK_SH) as handle:
            journal = _read(handle)
        waiting = {
            (e.member_id, e.seq) for e in journal.entries
            if e.worker != spooled_by and e.seq not in journal.settled
        }
        for count, draft in enumerate(drafts):
            if isinstance(draft, EventDraft) and draft.offline_seen is not None and any(
                member == draft.member_id and seq < draft.offline_seen
                for member, seq in waiting
            ):
                return count
        return len(drafts)

    async def unsettled_elsewhere(self) -> frozenset[str]:
        """Portals with journal entries of *other* workers not yet in PostgreSQL. Online judging
        asks before every append, so it is cached by the journal's stat (a few µs): the file is
        read only after it changed, i.e. around outages."""
        try:
            stat = os.stat(self._journal_path)
        except FileNotFoundError:
            return frozenset()
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if key != self._elsewhere_key:
            # read after the stat: a change in between is read now and seen again next time
            self._elsewhere, self._doubted = await asyncio.to_thread(self._read_elsewhere)
            self._elsewhere_key = key
        return self._elsewhere

    async def doubted(self) -> frozenset[str]:
        """Portals in doubt (any worker's), cached as `unsettled_elsewhere` is."""
        await self.unsettled_elsewhere()
        return self.last_doubted()

    def last_doubted(self) -> frozenset[str]:
        """`doubted` as of the last `unsettled_elsewhere` (no journal: none)."""
        return self._doubted if self._elsewhere_key is not None else frozenset()

    def _read_elsewhere(self) -> tuple[frozenset[str], frozenset[str]]:
        with self._locked(fcntl.LOCK_SH) as handle:
            journal = _read(handle)
        return frozenset(e.member_id for e in journal.entries
                         if e.worker != self._worker and e.seq not in journal.settled
                         ), journal.doubted()

    async def settle_doubts(self, store: EventStore, portals: frozenset[str] | None = None,
                            *, unless_tried_within: float = 0.0) -> frozenset[str]:
        """Settle every doubt (of `portals`, or all) PostgreSQL can answer now, whichever
        worker recorded it — a worker that is gone, whose drain failed or whose spool record
        was set aside, or that is cut off itself; answers the portals still in doubt. Raises
        LedgerError when PostgreSQL is away.

        A doubt is over once its transaction is (`EventStore.settle_transaction`; one still
        running is ended: it was given up on, its worker killed or cut off); what it committed
        is what PostgreSQL holds of its deliveries. Found stored, the deliveries' spooled
        entries are settled at their trust events (as their drain would settle them: in
        PostgreSQL now), and shared with the trust events' effects and dedup facts as their
        COMMIT would have been (`_share`), the offline state then has them whether or not
        anything was spooled; not found, their spooled entries stand as any spooled lifecycle
        entry does (judged again on drain, by a PostgreSQL that never held them). Either way
        the portals are judged offline again, by every worker. A doubt recorded without its
        transaction (by an older version) is settled only by the drain of its worker's spool
        (that worker's, or an adopter's: `ledger.adoption`).
        `unless_tried_within`: seconds — a doubt that could not be settled is not tried again
        sooner (the committer asks for every batch of a doubted portal: it must not wait on a
        transaction that will not end, batch after batch)."""
        doubted = await self.doubted()
        if portals is not None:
            doubted &= portals
        if not doubted:
            return frozenset()
        now = time.monotonic()
        if now - self._settle_tried < unless_tried_within:
            return doubted
        journal = await asyncio.to_thread(self._read_shared)
        groups: dict[tuple[int, Transaction], list[tuple[str, str]]] = {}
        for (worker, member_id, cause), transaction in journal.doubts.items():
            if transaction is not None and member_id in doubted:
                groups.setdefault((worker, transaction), []).append((member_id, cause))
        settled: list[tuple[int, Transaction, list[tuple[str, str]], list[FoundStored]]] = []
        for (worker, transaction), keys in groups.items():
            try:
                found = await store.settle_transaction(
                    transaction, [(m, bytes.fromhex(c)) for m, c in keys],
                    end_wait_ms=_END_WAIT_MS)
            except DatabaseUnavailable:
                raise
            except LedgerError as exc:
                # one doubt PostgreSQL refuses to be asked about (a damaged intent) kept every
                # other doubt after it unsettled, for good
                self._unanswerable(worker, transaction, keys, exc)
                continue
            if found is not None:
                settled.append((worker, transaction, keys, found))
        if settled:
            await asyncio.to_thread(self._write_settled, settled)
        self._elsewhere_key = None  # the journal changed (or may have): read it next time
        remaining = await self.doubted() & doubted
        self._settle_tried = now if remaining else -float("inf")
        return remaining

    def _unanswerable(self, worker: int, transaction: Transaction,
                      keys: list[tuple[str, str]], exc: LedgerError) -> None:
        """Logged once a doubt (every refresh asks again)."""
        if transaction in self._unanswered:
            return
        if len(self._unanswered) >= _REPORTED_LINES_MAX:
            self._unanswered.clear()
        self._unanswered.add(transaction)
        log.error("worker %d's lifecycle doubt (portal(s) %s, transaction %s) cannot be "
                  "settled: PostgreSQL refused the question (%s). The other doubts are settled "
                  "without it; this one lasts until worker %d drains its batch. If its intent "
                  "in %s is damaged (no transaction of this ledger), stop every worker, remove "
                  "that line and start them again: its deliveries are judged again on drain",
                  worker, ", ".join(sorted({m for m, _ in keys})), transaction.as_json(), exc,
                  worker, self._journal_path)

    def _read_shared(self) -> _Journal:
        with self._locked(fcntl.LOCK_SH) as handle:
            return _read(handle)

    def _write_settled(
        self, settled: Sequence[tuple[int, Transaction, list[tuple[str, str]], list[FoundStored]]],
    ) -> None:
        """The journal lines that settle these doubts (`settle_doubts`)."""
        with self._locked(fcntl.LOCK_EX) as handle:
            journal = _read(handle)
            next_seq = journal.next_seq
            lines: list[dict[str, Any]] = []
            for worker, transaction, keys, found in settled:
                keys = [(m, c) for m, c in keys
                        if journal.doubts.get((worker, m, c)) == transaction]
                if not keys:
                    continue  # settled meanwhile (its drain, another worker)
                stored = {(f.member_id, f.dedup_key.hex()): f for f in found}
                for entry in journal.entries:
                    hit = stored.get((entry.member_id, entry.cause))
                    if hit is not None and entry.seq not in journal.settled:
                        lines.append({"settled": entry.seq, "position": hit.trust_position,
                                      "at": time.time()})
                for f in found:
                    effect = effect_of(f.trust_payload) if f.trust_payload else None
                    if effect is None or f.trust_position is None:
                        continue
                    lines.append({"seq": next_seq, "worker": self._worker,
                                  "member_id": f.member_id, "cause": "",
                                  "effect": effect.as_json(),
                                  "stored": [f.dedup_key.hex(), f.position,
                                             f.accepted_under.hex()
                                             if f.accepted_under is not None else None]})
                    lines.append({"settled": next_seq, "position": f.trust_position,
                                  "at": time.time()})
                    next_seq += 1
                lines.append({"resolved": [list(k) for k in keys], "worker": worker})
                log.warning(
                    "doubt settled by worker %d: worker %d's append of %d lifecycle "
                    "deliveries (portal(s) %s) %s; judged offline again by every worker",
                    self._worker, worker, len(keys), ", ".join(sorted({m for m, _ in keys})),
                    f"committed ({len(found)} found stored)" if found
                    else "did not commit (none found stored)")
            _append(handle, lines)

    def held(self, drafts: Sequence[Draft]) -> frozenset[int]:
        """Which of these spooled drafts, accepted offline on provisional trust, the drain
        stores as accepted: those whose portal's earlier journal entries all reached PostgreSQL.

        Their acceptance was judged on exactly those entries, in order; judging them again by
        PostgreSQL's trust *now* would judge them by whatever other workers drained after them
        (a later uninstall or reinstall) — acknowledged, then refused. A draft is judged again
        when an entry it depended on was refused (a stale offline state: then PostgreSQL's trust
        wins), when the entries were compacted away, and when it changes trust itself (its own
        entry: a lifecycle event is always judged by PostgreSQL, in journal order)."""
        candidates = [
            (index, draft) for index, draft in enumerate(drafts)
            if isinstance(draft, EventDraft) and draft.offline_seen is not None
            and not draft.offline_accepted
        ]
        if not candidates:
            return frozenset()
        with self._locked(fcntl.LOCK_SH) as handle:
            journal = _read(handle)
        causes = {(e.member_id, e.cause) for e in journal.entries}
        refused = {(e.member_id, e.seq) for e in journal.entries
                   if e.seq in journal.settled and journal.settled[e.seq] is None}
        held: set[int] = set()
        for index, draft in candidates:
            assert isinstance(draft, EventDraft)
            assert draft.offline_seen is not None
            if draft.offline_seen <= journal.floor:
                continue
            if (draft.member_id, draft.dedup_key.hex()) in causes:
                continue
            if any(member == draft.member_id and seq < draft.offline_seen
                   for member, seq in refused):
                continue
            held.add(index)
        return frozenset(held)

    def settle(
        self, drafts: Sequence[Draft], outcomes: Sequence[Outcome],
        effects: Sequence[PlannedEffect], *, worker: int | None = None,
    ) -> None:
        """After a drain committed: the spooling worker's journal entries for these drafts are
        in PostgreSQL now (at their trust event's position), or were refused there; its doubts
        about them are over (recorded with a transaction or, by an older version, without).
        `worker`: whose spool they drained from (default this one's; `drainable`)."""
        spooled_by = self._worker if worker is None else worker
        caused = {e.cause: e.position for e in effects}
        drained: dict[tuple[str, str], int | None] = {}
        for index, (draft, outcome) in enumerate(zip(drafts, outcomes, strict=True)):
            if not isinstance(draft, EventDraft):
                continue
            key = (draft.member_id, draft.dedup_key.hex())
            if isinstance(outcome, Refusal):
                drained[key] = None
            elif isinstance(outcome, Stored):
                drained[key] = caused.get(index, outcome.position)
            elif key not in drained:  # a duplicate: stored by an earlier drain
                # (a copy behind its original in this batch leaves the original's settlement:
                # its trust event's position, not the event's — settled there, the entry was
                # applied again after this worker's later commits, bench.churn's lost 202s)
                drained[key] = getattr(outcome, "position", None)
        if not drained:
            return
        with self._locked(fcntl.LOCK_EX) as handle:
            journal = _read(handle)
            lines: list[dict[str, Any]] = [
                {"settled": e.seq, "position": drained[(e.member_id, e.cause)],
                 "at": time.time()}
                for e in journal.entries
                if e.worker == spooled_by and e.seq not in journal.settled
                and (e.member_id, e.cause) in drained
            ]
            # drained, the given-up append's lifecycle deliveries are in PostgreSQL (found
            # stored: it did commit; or stored now) or refused there: no longer in doubt
            resolved = [[m, c] for w, m, c in sorted(journal.doubts)
                        if w == spooled_by and (m, c) in drained]
            if resolved:
                lines.append({"resolved": resolved, "worker": spooled_by})
            _append(handle, lines)

    def settle_lost(self, held: Callable[[set[tuple[str, str]]], set[tuple[str, str]]], *,
                    worker: int | None = None) -> None:
        """The spooling worker's open journal entries whose delivery is no longer in its spool
        (`held`: of the entries' (portal, dedup key hex), those the spool still holds,
        `Spool.held_among`) — its record set aside unread, or moved aside torn at start-up —
        are settled as refused, as `Appender.set_aside` settles what it sets aside: nothing
        will ever drain them, and provisional they kept their portals provisional (judged on an
        effect PostgreSQL never got) for good. The spool is read outside the journal's lock
        (it may be huge) and only when the worker has open entries; nothing else writes this
        worker's entries meanwhile (its own committer, or the adopter holding its spool, is
        the caller)."""
        spooled_by = self._worker if worker is None else worker

        def still_open(journal: _Journal) -> list[_Entry]:
            return [e for e in journal.entries
                    if e.worker == spooled_by and e.cause and e.seq not in journal.settled]

        with self._locked(fcntl.LOCK_SH) as handle:
            wanted = {(e.member_id, e.cause) for e in still_open(_read(handle))}
        if not wanted:
            return
        kept = held(wanted)
        with self._locked(fcntl.LOCK_EX) as handle:
            lost = [e for e in still_open(_read(handle))
                    if (e.member_id, e.cause) in wanted - kept]
            if not lost:
                return
            log.error("%d offline trust journal entries of worker %d (portal(s) %s) lost their "
                      "spooled delivery (set aside unread, or torn): settled as refused",
                      len(lost), spooled_by, ", ".join(sorted({e.member_id for e in lost})))
            _append(handle, [{"settled": e.seq, "position": None, "at": time.time()}
                             for e in lost])

    def view(self) -> tuple[TrustFacts, set[str]]:
        """The state offline judging uses now, and the portals it is provisional for."""
        with self._locked(fcntl.LOCK_SH) as handle:
            return self._view(_read(handle))

    def _view(self, journal: _Journal) -> tuple[TrustFacts, set[str]]:
        """The base, then every change committed since (this worker's own and the journal's
        settled entries) in PostgreSQL's order — by position, not by who learned of it when
        (own first, another worker's earlier commit undid a later own one) — then the
        entries not yet in PostgreSQL, in journal order."""
        base, base_position, own_changes = self._state  # once: a refresh may replace it
        facts = base.copy()
        committed: dict[int, tuple[TrustEffect, bool]] = {
            position: (effect, True) for position, effect in own_changes
            if position > base_position
        }
        provisional: set[str] = set()
        pending: list[TrustEffect] = []
        for entry in journal.entries:
            if entry.seq not in journal.settled:
                provisional.add(entry.member_id)
                pending.append(entry.effect)
                continue
            settled = journal.settled[entry.seq]
            if (settled is None or settled <= base_position or settled in committed
                    or entry.seq < journal.rewound):
                continue  # refused, already in the base or among our own, or maybe lost
            committed[settled] = (entry.effect, False)
        for position in sorted(committed):
            effect, own = committed[position]
            apply(facts, effect if own else _usable(effect, facts), position)
        for effect in pending:
            apply(facts, _usable(effect, facts), 0)
        return facts, provisional

    # ---- files -------------------------------------------------------------------------

    def _open_journal(self) -> IO[bytes]:
        # opened by path (`opener`): the handle's name is the path, for `_read`'s log lines
        return open(self._journal_path, "r+b",
                    opener=lambda path, _: os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND,
                                                   0o600))

    @contextlib.contextmanager
    def _locked(self, mode: int) -> Iterator[IO[bytes]]:
        with self._open_journal() as handle:
            self._flock(handle, mode)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _compact(self) -> None:
        """Empty the journal once everything in it is in PostgreSQL (and old enough for every
        worker to have refreshed past it) and every worker's spool drained; sequence numbers
        continue where they were. Also one holding only resolved intents (`_intend`): every
        append of installs or uninstalls writes two lines, also a forged install's refused
        403 — kept until a trust entry came along, they grew it for good."""
        with self._locked(fcntl.LOCK_EX) as handle:
            journal = _read(handle)
            if (journal.lines <= 1 or len(journal.settled) < len(journal.entries)
                    or journal.doubts):
                return
            if any(p is not None and p > self.base_position and seq >= journal.rewound
                   for seq, p in journal.settled.items()):
                return
            if time.time() - journal.settled_at < _COMPACT_AFTER_SECONDS:
                return
            if any_pending(self._directory.parent):
                # a spooled draft accepted on provisional trust (a dead worker's, say) finds
                # the entries it depended on only here: compacted away, it would be judged
                # again by today's trust on drain (found by a test: acknowledged, then refused)
                return
            handle.truncate(0)
            _append(handle, [{"next_seq": journal.next_seq}])

    def _load_snapshot(self) -> tuple[TrustFacts, int] | None:
        """The saved base, with the saved worker's own later changes folded in."""
        try:
            saved: dict[str, Any] = orjson.loads(self._snapshot_path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        facts = TrustFacts(
            {
                m: PortalTrust(m, t["domain"], TrustState(t["state"]),
                               bytes.fromhex(t["token_sha256"]) if t["token_sha256"] else None)
                for m, t in saved["portals"].items()
            },
            {
                a["position"]: Allowance(a["position"], a["member_id"], a["domain"])
                for a in saved["allowances"]
            },
        )
        for own_position, payload in saved.get("own", []):
            effect = effect_of(payload)
            if effect is not None:
                apply(facts, effect, own_position)
        history = saved.get("history")
        if history is not None:  # the first refresh checks the database still has it
            self._history = (int(history[0]), bytes.fromhex(history[1]))
        # the base's position: a refresh re-reads from there, re-applying the own changes too
        return facts, int(saved["position"])

    def _save_snapshot(self, *, replace_newer: bool = False) -> None:
        """Atomically, and never over a newer one another worker saved (`replace_newer`: a
        newer one is of a history the database went back from)."""
        base, base_position, own = self._state  # once: a refresh may replace it meanwhile
        known = max([base_position, *(p for p, _ in own)])
        try:
            saved_known = int(orjson.loads(self._snapshot_path.read_bytes())["known"])
        except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            saved_known = -1
        if saved_known > known and not replace_newer:
            return
        data = {
            "position": base_position,
            "history": ([self._history[0], self._history[1].hex()]
                        if self._history is not None else None),
            "known": known,
            "own": [(p, e.as_json()) for p, e in own if p > base_position],
            "portals": {
                m: {"domain": t.domain, "state": t.state.value,
                    "token_sha256": t.token_sha256.hex() if t.token_sha256 else None}
                for m, t in base.portals.items()
            },
            "allowances": [
                {"position": a.position, "member_id": a.member_id, "domain": a.domain}
                for a in base.allowances.values()
            ],
        }
        # one name per thread: a refresh and a commit may save at the same time
        temporary = self._snapshot_path.with_suffix(
            f".{os.getpid()}-{self._worker}-{threading.get_ident()}.tmp"
        )
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(orjson.dumps(data))
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self._snapshot_path)


def _usable(effect: TrustEffect, facts: TrustFacts) -> TrustEffect:
    """A journal entry's effect without an allowance the state no longer holds."""
    if effect.allowance_position is not None and (
        effect.allowance_position not in facts.allowances
    ):
        return replace(effect, allowance_position=None)
    return effect


def _remembered(recent: RecentCommits, journal: _Journal, facts: Facts,
                wanted: Sequence[tuple[str, bytes]]) -> Facts:
    """`facts` with the dedup facts known offline for these keys: this worker's own recent
    commits, and the lifecycle deliveries any worker committed while the journal holds them."""
    recent.fill(facts, wanted)
    if len(facts.seen) == len(wanted):
        return facts
    shared = {(e.member_id, e.stored[1]): e.stored for e in journal.entries
              if e.stored is not None and e.seq >= journal.rewound}
    for key in wanted:
        found = shared.get(key)
        if found is not None and key not in facts.seen:
            facts.seen[key] = found[2]
            if found[3] is not None:
                facts.accepted[found[2]] = found[3]
    return facts


def _spooled_elsewhere(journal: _Journal, facts: Facts,
                       wanted: Sequence[tuple[str, bytes]]) -> None:
    """Adds to `facts.spooled` the lifecycle deliveries any worker spooled and has not drained
    (the causes of the journal's open entries), with the token an install established: a copy
    of one is a copy here too, moving no trust. Judged as new, a late copy of another worker's
    spooled install after the portal's spooled uninstall took the allowance of the genuine
    reinstall, which was then refused 403 with everything under its token (bench.churn's
    never-stored)."""
    if not wanted:
        return
    open_causes = {(e.member_id, e.cause): e.effect.token_sha256 for e in journal.entries
                   if e.cause and e.seq not in journal.settled}
    if not open_causes:
        return
    for key in wanted:
        cause = (key[0], key[1].hex())
        if cause in open_causes and key not in facts.spooled:
            facts.spooled[key] = open_causes[cause]


def _stored_of(record: dict[str, Any], member_id: str) -> Committed | None:
    """The `stored` field of a journal line (a torn or foreign one: none)."""
    value = record.get("stored")
    try:
        key, position, digest = value  # type: ignore[misc]  # checked by the except
        return (member_id, bytes.fromhex(key), int(position),
                bytes.fromhex(digest) if digest is not None else None)
    except (TypeError, ValueError):
        return None


def _read(handle: IO[bytes]) -> _Journal:
    """The journal, line by line. A line that is not a record this version writes (the file
    edited, the disk corrupting it, another version sharing the directory) is passed over —
    logged once with what to do (`_passed_over`): read as a record, it raised past every
    caller, and every delivery at every worker was answered 503 not_stored. A line after the
    last newline is one a crash tore: its writer never acknowledged what it wrote (an intent
    torn so never had its COMMIT sent), so it is passed over without a word."""
    handle.seek(0)
    journal = _Journal([], {}, 0.0, 0)
    lines = handle.read().split(b"\n")
    lines.pop()  # b"" after the last newline, or a line torn by a crash
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        journal.lines += 1
        try:
            _read_record(journal, orjson.loads(line))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            _passed_over(handle, number, line, exc)
    # a shared commit's entry (no cause: `_share`, `_write_settled`) is written with its
    # settlement in one write; without it, a crash tore that write and the next cut the rest
    # off. Its change is in PostgreSQL (shared after the COMMIT) and no spool stands for it:
    # kept open, every other worker spooled the portal's lifecycle behind it, never drained
    journal.entries = [e for e in journal.entries if e.cause or e.seq in journal.settled]
    return journal


def _read_record(journal: _Journal, record: Any) -> None:
    """One line into `journal`; raises (changing nothing) for a line of another shape."""
    if not isinstance(record, dict):
        raise TypeError(f"a JSON {type(record).__name__}, not an object")
    if "rewound" in record:
        journal.rewound = max(journal.rewound, _integer(record["rewound"]))
    elif "next_seq" in record:
        next_seq = _integer(record["next_seq"])
        journal.next_seq = max(journal.next_seq, next_seq)
        journal.floor = max(journal.floor, next_seq)
    elif "settled" in record:
        seq, position = _integer(record["settled"]), record["position"]
        at = float(record["at"])
        if position is not None:
            position = _integer(position)
        journal.settled[seq] = position
        journal.settled_at = max(journal.settled_at, at)
    elif "doubt" in record:
        # the intent (before the COMMIT) names the transaction; the spool's line after a
        # give-up repeats the deliveries it spooled, with it too
        transaction = Transaction.of_json(record.get("txn"))
        worker, keys = _integer(record["worker"]), _keys(record["doubt"])
        for m, c in keys:
            key = (worker, m, c)
            if transaction is not None or key not in journal.doubts:
                journal.doubts[key] = transaction
    elif "resolved" in record:
        worker, keys = _integer(record["worker"]), _keys(record["resolved"])
        for m, c in keys:
            journal.doubts.pop((worker, m, c), None)
    else:
        payload, member_id, cause = record["effect"], record["member_id"], record["cause"]
        if not isinstance(payload, dict) or not isinstance(member_id, str):
            raise TypeError("not a journal entry")
        _hex(cause)  # a dedup key, or "" (a shared commit)
        effect = effect_of(payload)
        if effect is None:
            return
        seq, worker = _integer(record["seq"]), _integer(record["worker"])
        journal.entries.append(_Entry(seq, worker, member_id, cause, effect,
                                      _stored_of(record, member_id)))
        journal.next_seq = max(journal.next_seq, seq + 1)


def _integer(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _keys(value: Any) -> list[tuple[str, str]]:
    """A doubt's or a resolution's deliveries: [member_id, dedup key (hex)] pairs."""
    keys = [(m, c) for m, c in value]
    for m, c in keys:
        if not isinstance(m, str) or not _hex(c):
            raise TypeError("not [member_id, dedup key] pairs")
    return keys


def _hex(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not hex")
    bytes.fromhex(value)  # ValueError if not
    return value


def _passed_over(handle: IO[bytes], number: int, line: bytes, exc: Exception) -> None:
    """One ERROR line per bad journal line per process (every worker reads the journal often:
    each read logging it again would bury the log); bounded."""
    key = hashlib.sha256(line).digest()
    if key in _REPORTED_LINES:
        return
    if len(_REPORTED_LINES) >= _REPORTED_LINES_MAX:
        _REPORTED_LINES.clear()
    _REPORTED_LINES.add(key)
    log.error("line %d of the offline trust journal %s is not a record this version writes "
              "(%s: %s; it begins %r): passed over. The ledger never writes such a line: the "
              "file was edited or corrupted, or a worker of another version shares the trust "
              "directory (run one version everywhere). Nothing in PostgreSQL is affected; the "
              "line goes when the journal is next emptied. If it was a lifecycle doubt or "
              "entry, deliveries judged during this outage may be judged without it: compare "
              "the rejections recorded on drain", number, getattr(handle, "name", "journal.log"),
              type(exc).__name__, exc, line[:120])


def _append(handle: IO[bytes], lines: list[dict[str, Any]], *, durable: bool = True) -> None:
    """Append whole lines, fsync'd (unless not `durable`); a write that fails part-way is cut
    back off, and a torn tail left by a crash is cut off before anything is appended after it
    (else the next, acknowledged line would be glued to it and unreadable)."""
    if not lines:
        return
    end = handle.seek(0, os.SEEK_END)
    if end:
        handle.seek(end - 1)
        if handle.read(1) != b"\n":
            handle.seek(0)
            data = handle.read()
            end = data.rfind(b"\n") + 1
            handle.truncate(end)
            handle.seek(end)
    try:
        handle.write(b"".join(orjson.dumps(line) + b"\n" for line in lines))
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            handle.truncate(end)
            os.fsync(handle.fileno())
        raise


class JournalTurn:
    """The journal, held exclusively by one online append of lifecycle deliveries from the
    moment it holds the events head lock until its trust changes are shared.

    Offline judgement is serialised by the journal's lock, online judgement by the head lock;
    a worker's committed install or uninstall reached the journal only after its COMMIT, and
    its check for other workers' spooled lifecycle events came before its head lock. In either
    gap another worker, offline, judged the portal without it: a reinstall answered 202 on an
    uninstall PostgreSQL no longer had (or a delivery under a token it had ended), refused on
    drain — acknowledged and lost (bench.churn, 2 of 10 runs at `--kill 0.05`). Held across
    both, the two orders are one: a worker judging offline waits for the share (milliseconds;
    lifecycle deliveries are rare), and a lifecycle entry spooled after the early check is
    seen under the lock (LifecycleNotDrained: the batch is spooled behind it).
    No deadlock: the journal is taken only after the head lock, and nothing else holding the
    journal ever waits for PostgreSQL (every other use of it is a short synchronous block).
    The turn's holder does wait for PostgreSQL (its statements, its COMMIT): when the
    committer stops waiting for it (the append timeout) it spools the batch under the
    journal's lock, so the turn is given up then (`give_up`) — else a stalled PostgreSQL held
    the worker's spool, and every other worker's offline judgement, for as long as the
    statement's own timeout (found by breakturn: no answer for 60 s).
    Given up on before its COMMIT, the append stops there (`committing`: rolled back). Given up
    on, or its connection lost, with its COMMIT in flight, it may have committed or not: the
    journal, still locked, goes to the spool of its batch (`Doubt`), which records its portals
    in doubt before anyone else judges them — let go instead, another worker judged them
    without the commit that landed later (a delivery under an ended token answered 202)."""

    def __init__(self, trust: OfflineTrust, drafts: Sequence[EventDraft]) -> None:
        self._trust = trust
        self.portals = frozenset(d.member_id for d in drafts)
        self.transaction: Transaction | None = None
        # the intent written for `transaction` and not yet resolved (`_intend`)
        self.intended: list[list[str]] | None = None
        self.succeeded = False  # the append returned: its COMMIT went through
        self.handle: IO[bytes] | None = None
        self.given_up = False
        self.commit_sent = False  # from here the append may have committed, whatever befalls it
        # the portals whose trust its COMMIT may move (the plan's trust changes, `committing`):
        # only theirs are in doubt when it is cut off
        self.doubtful = self.portals
        self.shared = False  # what it committed is in the journal
        self._busy = False  # a thread uses `handle`: closing it waits for that thread
        self._closing = False

    async def take(self, transaction: Transaction) -> None:
        """Under the events head lock (`EventStore.append_planned`'s `under_lock`), in
        `transaction`. Given up on, raises TimeoutError: the transaction rolls back, the
        spooled copy is drained. The intent is written once the batch is judged (`intend`)."""
        self._check()
        self.transaction = transaction
        if self.handle is None:
            opening = asyncio.ensure_future(asyncio.to_thread(self._trust._open_exclusive))
            try:
                handle = await asyncio.shield(opening)
            except asyncio.CancelledError:
                # the thread still gets the lock: it must not be kept by nobody
                opening.add_done_callback(_close_when_opened)
                raise
            if self.given_up:  # while it waited for the journal
                handle.close()
            self._check()
            self.handle = handle
        waited_on = await self.in_thread(
            lambda handle: self._trust._waited_on(handle, self.portals))
        self._check()
        if waited_on:
            raise LifecycleNotDrained(
                f"portal(s) {', '.join(sorted(waited_on))} wait on another worker's spooled "
                "lifecycle events; spooling behind them")

    async def intend(self, changing: frozenset[tuple[str, bytes]]) -> None:
        """Once the batch is judged, under the head lock, before its COMMIT
        (`EventStore.append_planned`'s `planned`), only when its plan changes trust: the
        intent (`_intend`) names the deliveries whose trust changes the COMMIT would commit —
        the only ones a COMMIT of unknown outcome leaves in doubt (`committing`). A batch of
        installs refused (forged ones) or found stored writes none: written before judging,
        every such batch cost an fsync, an unauthenticated sender's to spend."""
        self._check()
        keys = [[m, k.hex()] for m, k in sorted(changing) if m in self.portals]
        transaction = self.transaction
        if not keys or transaction is None:
            return

        def write(handle: IO[bytes]) -> None:
            # set by the thread: given up on meanwhile, `_thread_done` must know of it
            self.intended = self._trust._intend(handle, keys, transaction)

        await self.in_thread(write)
        self._check()

    async def end(self) -> None:
        """The append ended (`Appender.append`'s `finally`): an intent not yet resolved is
        resolved when the append committed or stopped before its COMMIT; it stays — a doubt
        for any worker to settle — when the COMMIT was sent and the outcome is unknown (a
        cancellation on shutdown, an unexpected failure). Then the journal is let go of."""
        if (self.intended is not None and self.handle is not None and not self.given_up
                and not self._busy and (self.succeeded or not self.commit_sent)):
            keys = self.intended
            with contextlib.suppress(OSError):  # a doubt left is settled by any worker
                await self.in_thread(lambda handle: self._trust._resolve(handle, keys))
                self.intended = None
        self.release()

    def committing(self, changing: frozenset[tuple[str, bytes]]) -> None:
        """Just before the append's COMMIT is sent (`EventStore.append_planned`), with the
        deliveries whose trust changes it commits. Given up on before, it stops here — rolled
        back, its spooled copy is the only one; after, it may commit unseen (`in_doubt`) — but
        only the portals of `changing`: a COMMIT of installs refused (a forged one naming a
        trusted portal) or found stored moves no trust whether it lands or not. (Their
        portals were in doubt too, and with nothing spooled standing for the refused install,
        every delivery of the genuine portal was answered 503 offline.)"""
        self._check()
        self.commit_sent = True
        self.doubtful = frozenset(m for m, _ in changing) & self.portals

    async def in_thread(self, call: Callable[[IO[bytes]], _T]) -> _T:
        """`call(handle)` in a thread, the turn held. Shielded: an append cancelled meanwhile
        (shutdown) lets go of the journal only when the thread is done with it — closed under
        it, a share was cut off mid-write."""
        assert self.handle is not None
        handle = self.handle
        self._busy = True
        working = asyncio.ensure_future(asyncio.to_thread(call, handle))
        working.add_done_callback(self._thread_done)
        return await asyncio.shield(working)

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self._busy = False
        if self.given_up or self._closing:
            self._withdraw()
            self.release()

    def _withdraw(self) -> None:
        """Let go of while a thread wrote its intent (the append timeout, a cancellation),
        the append never sends its COMMIT: the intent is resolved before the journal is let
        go of — left, it put the batch's portals in doubt for a COMMIT that never was, and
        the spool of the batch given up on answered its own deliveries 503."""
        if self.commit_sent or self.intended is None or self.handle is None:
            return
        keys, self.intended = self.intended, None
        with contextlib.suppress(OSError):  # a doubt left is settled by any worker
            self._trust._resolve(self.handle, keys)  # one short write, not fsync'd

    def in_doubt(self) -> bool:
        """Whether the append, ended or given up on now, may have committed unshared."""
        return (self.commit_sent and not self.shared and self.handle is not None
                and not self._busy)

    def hand_over(self) -> Doubt:
        """The journal, still locked, for the spool of this append's batch (`in_doubt`)."""
        handle, self.handle = self.handle, None
        assert handle is not None
        return handle, self.doubtful, self.transaction

    def give_up(self) -> Doubt | None:
        """The committer stopped waiting for this append and spools its batch, under the
        journal's lock: let go of it now (or as soon as the thread using it is done) — or,
        when the append may yet commit, hand it to that spool (`in_doubt`). Should the append
        still commit, it shares what it committed taking the lock as any use does; its
        spooled copy's journal entries stand for it meanwhile, and its drain settles them."""
        self.given_up = True
        if self.in_doubt():
            return self.hand_over()
        if self.intended is not None and self.handle is not None and not self._busy:
            # before its COMMIT: it never sends one now (`committing`), so its intent is
            # resolved by the spool, under the lock it takes over (else the spool found its
            # own batch's portals in doubt)
            handle, self.handle = self.handle, None
            return handle, frozenset(), self.transaction
        self.release()
        return None

    def _check(self) -> None:
        if self.given_up:
            raise TimeoutError("the committer gave up waiting for this append (its batch is "
                               "spooled): it judges nothing more")

    def release(self) -> None:
        if self._busy:  # closed when the thread is done (`_thread_done`)
            self._closing = True
            return
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.close()  # closing the descriptor lets go of its lock


def _close_when_opened(opening: asyncio.Future[IO[bytes]]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class Appender:
    """The store as the group committer uses it: appends (keeping the offline state current),
    offline spooling, and the drain's order across workers."""

    def __init__(self, store: EventStore, offline: OfflineTrust, *,
                 drains_for: int | None = None) -> None:
        """`drains_for`: the worker number whose spool this appender drains, when it is not
        `offline`'s own (`ledger.adoption`): its journal entries are settled and ordered as
        that worker's drain would."""
        self._store = store
        self._offline = offline
        self._spooled_by = offline.worker if drains_for is None else drains_for
        self._turns: set[JournalTurn] = set()  # held by appends not yet ended
        self._doubt: Doubt | None = None  # for the spool of the batch given up on
        self._doubt_spooled = False  # and it was: drained at once, it settles the doubt

    async def append(self, drafts: Sequence[Draft], *, draining: bool = False) -> list[Outcome]:
        self._forget_doubt()
        if draining:
            held = await asyncio.to_thread(self._offline.held, drafts)
        else:
            held = frozenset()
            await self._after_other_workers(drafts)
        lifecycle = [d for d in drafts if isinstance(d, EventDraft)
                     and d.event_type in _LIFECYCLE]
        turn = self._offline.turn(lifecycle) if lifecycle and not draining else None
        if turn is not None:
            self._turns.add(turn)
        try:
            outcomes = await self._append(drafts, draining, held, turn)
            if turn is not None:
                turn.succeeded = True
            return outcomes
        except (DatabaseUnavailable, TimeoutError):
            # its connection lost mid-statement or mid-COMMIT: the batch is spooled next, and
            # may have committed — in doubt as when given up on
            if turn is not None and turn.in_doubt():
                self._hold_doubt(turn.hand_over())
            raise
        finally:
            if turn is not None:
                self._turns.discard(turn)
                await turn.end()

    def give_up(self) -> None:
        """The committer stopped waiting for the append (`JournalTurn.give_up`)."""
        for turn in self._turns:
            doubt = turn.give_up()
            if doubt is not None:
                self._hold_doubt(doubt)

    def _hold_doubt(self, doubt: Doubt) -> None:
        self._forget_doubt()
        self._doubt = doubt

    def _forget_doubt(self) -> None:
        """A doubt no spool took (the committer has no spool: nothing is judged offline)."""
        doubt, self._doubt = self._doubt, None
        if doubt is not None:
            doubt[0].close()

    async def _append(self, drafts: Sequence[Draft], draining: bool, held: frozenset[int],
                      turn: JournalTurn | None) -> list[Outcome]:
        outcomes, effects, committed = await self._store.append_planned(
            drafts, draining=draining, held=held,
            under_lock=turn.take if turn is not None else None,
            committing=turn.committing if turn is not None else None,
            planned=turn.intend if turn is not None else None)
        self._offline.remember(committed)
        if draining:
            self._offline.drained(drafts)
        if log.isEnabledFor(logging.DEBUG):
            for draft, outcome in zip(drafts, outcomes, strict=True):
                if isinstance(draft, EventDraft) and draft.event_type in _LIFECYCLE:
                    log.debug("%s %s portal=%s key=%s worker=%d -> %s",
                              "drained" if draining else "online", draft.event_type,
                              draft.member_id, draft.dedup_key.hex()[:12],
                              self._offline.worker, getattr(outcome, "code", None)
                              or f"{type(outcome).__name__} {getattr(outcome, 'position', '')}")
        stored = {c[2]: c for c in committed}
        if draining:
            for draft, outcome in zip(drafts, outcomes, strict=True):
                if isinstance(draft, EventDraft) and isinstance(outcome, Refusal):
                    log.error("a %s for portal %s answered 202 during an outage was refused on "
                              "drain (%s): the offline trust state was stale; its rejection "
                              "record holds it", draft.event_type, draft.member_id, outcome.code)
        try:
            await self._offline.note_committed(effects, [
                stored.get(getattr(outcomes[e.cause], "position", -1)) for e in effects],
                turn)
            if draining:
                await asyncio.to_thread(functools.partial(
                    self._offline.settle, drafts, outcomes, effects, worker=self._spooled_by))
        except LockWaitTimeout:
            if not draining:  # committed already: the senders must hear so
                log.exception("committed, but the offline trust state was not updated (the "
                              "next refresh catches up)")
                return outcomes
            # drained: nothing settles these journal entries but this drain (the refresh does
            # not), and marked drained they stayed open for good — their portals provisional,
            # every other worker's drain of them waiting. Left in the spool, the batch is
            # drained again once the journal's holder lets go: found stored, settled then.
            log.warning("drained %d spooled deliveries, but their journal entries could not be "
                        "settled now (the journal's lock was held too long): left in the spool, "
                        "to be found stored and settled on the next drain", len(drafts))
            raise
        except Exception:  # committed already: the senders must hear so
            log.exception("committed, but the offline trust state was not updated (the next "
                          "refresh catches up)")
        return outcomes

    async def _after_other_workers(self, drafts: Sequence[Draft]) -> None:
        """Online, a portal whose trust waits on another worker's spooled lifecycle events is
        judged after them: PostgreSQL's trust does not have them yet, so judging now would
        judge ahead of them — a genuine reinstall after a spooled uninstall refused, and every
        delivery the other worker accepted on its spooled lifecycle refused on its drain (found
        by bench.churn). Raises LifecycleNotDrained at once: the committer spools the batch,
        judged on the journal (after those entries, in arrival order) and drained after them
        (`drainable`). It used to wait up to 2 s for the other worker's drain first — and every
        delivery at this worker, of every portal, waited with it while other workers judged
        later deliveries of the same portals: a first install held so, behind another portal's
        wait, was judged after that portal's uninstall and reinstall another worker took 1.5 s
        later (refused token_replacement_refused, and everything under its token with it:
        bench.churn, 150 genuine deliveries never stored in one run)."""
        elsewhere = await self._offline.unsettled_elsewhere()
        doubted = self._offline.last_doubted()
        if not elsewhere and not doubted:
            return
        portals = frozenset(d.member_id for d in drafts if isinstance(d, EventDraft))
        if portals & doubted:
            # in doubt: this worker reaches PostgreSQL, so it settles the doubt first (any
            # worker's) — spooled behind it, the portal's installs and uninstalls were 503
            try:
                doubted = await self._offline.settle_doubts(
                    self._store, portals & doubted, unless_tried_within=1.0)
            except DatabaseUnavailable:
                raise  # the committer spools the batch
            except LedgerError:  # not the deliveries' fault: they spool behind the doubt
                log.exception("a lifecycle doubt could not be settled")
            elsewhere = await self._offline.unsettled_elsewhere()
        if portals & (elsewhere | doubted):
            # a head lock this worker took ahead would hold up that worker's drain
            await self._store.let_go_ahead()
            raise LifecycleNotDrained(
                f"portal(s) {', '.join(sorted(portals & elsewhere))} wait on another worker's "
                "spooled lifecycle events; spooling behind them")

    def set_aside(self, drafts: Sequence[Draft]) -> None:
        """Spooled drafts the committer quarantines: their trust effects never land, so their
        journal entries are settled as refused (provisional state never outlives them)."""
        refused: list[Outcome] = [Refusal(500, "quarantined", "set aside from the spool", 0)
                                  for _ in drafts]
        self._offline.drained(drafts)
        self._offline.settle(drafts, refused, [], worker=self._spooled_by)

    def lost_from_spool(
        self, held: Callable[[set[tuple[str, str]]], set[tuple[str, str]]]
    ) -> None:
        """Records of the spool were set aside unread (or torn): their journal entries are
        settled as refused (`OfflineTrust.settle_lost`); `held`: `Spool.held_among`."""
        self._offline.settle_lost(held, worker=self._spooled_by)

    def spool_offline(
        self, drafts: Sequence[Draft], write: Callable[[list[Draft]], None]
    ) -> list[Outcome | LedgerError]:
        doubt, self._doubt = self._doubt, None  # the batch given up on is spooled next
        outcomes = self._offline.spool(drafts, write, doubt=doubt)
        self._doubt_spooled = self._doubt_spooled or (doubt is not None and bool(doubt[1]))
        return outcomes

    def in_doubt(self) -> bool:
        return self._doubt is not None and bool(self._doubt[1])

    def drain_at_once(self) -> bool:
        spooled, self._doubt_spooled = self._doubt_spooled, False
        return spooled

    def drainable(self, drafts: Sequence[Draft]) -> int:
        return self._offline.drainable(drafts, worker=self._spooled_by)
