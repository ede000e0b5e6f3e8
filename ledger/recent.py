"""What this worker itself recently stored: the dedup facts offline judging lacks.

While PostgreSQL is away a worker judges deliveries on its offline trust state
(`ledger.offline`) but cannot ask which deliveries are stored already. Without that, a
redelivery of a stored event is judged as new: refused 401/403 when its portal's trust moved
since (a reinstall with a new token), or — an install's copy after an uninstall — accepted as
an establishment that takes the allowance meant for the genuine reinstall, after which that
reinstall and every delivery with its token are refused.

`RecentCommits` remembers, for the Bitrix24 deliveries this worker committed (appended or
drained), their dedup key, position and the token digest they were accepted under by the
online rule (`ledger.planner.Plan.committed`, the store's `_ACCEPTED_UNDER`). The offline
planner consults it as the online planner consults `Facts.seen`/`Facts.accepted`, so a
redelivery is a duplicate offline exactly when it would be one online — the cache can only
turn a would-be judgement into the duplicate answer the store itself would give; it never
accepts anything new. Facts about stored events never go stale in one history (events are
append-only and a position's predecessors are fixed), so the oldest are evicted and nothing is
invalidated — unless PostgreSQL itself went back in history under the worker (a failover to a
replica that lost the last commits, a restore): then all is forgotten (`forget_all`).

Bounded by entries and by bytes (`LEDGER_OFFLINE_CACHE_ENTRIES`, `LEDGER_OFFLINE_CACHE_BYTES`);
only deliveries that passed trust and were committed enter it, so a sender cannot grow it past
either bound. In memory only: a restarted worker starts with it empty, and no worker knows what
another stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ledger.planner import Committed, Facts

# per entry besides the characters of its key: the dict slot, the key and value tuples, the
# str and bytes headers, the position int, a 32-byte digest. tracemalloc on CPython 3.11: 407 B
# for an entry with a 32-character member_id and a 32-byte key (this counts 416)
_ENTRY_OVERHEAD = 352

_Entries = dict[tuple[str, bytes], tuple[int, bytes | None]]


class RecentCommits:
    """Dedup keys this worker committed, in two generations of half the bounds each: when the
    young one is full it becomes the old one and the old one is dropped — the oldest commits go
    first, and nothing is done per delivery to evict (evicting one by one from the front of a
    dict walks the deleted slots there: 25 µs per delivery once full, measured; an OrderedDict
    0.9 µs). Remembered on the event loop, read by the offline judge in a thread (at once only
    after an append outlived its timeout): the judge only looks keys up, and a dict lookup or
    insert is atomic under the GIL; a generation swapped meanwhile costs a miss."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        """Never more than `max_entries` entries or `max_bytes` counted bytes; at least half
        of either once that many were committed (a bound under 2 entries keeps none)."""
        self._generation_entries = max_entries // 2
        self._generation_bytes = max_bytes // 2
        self._young: _Entries = {}
        self._old: _Entries = {}
        self._young_bytes = 0
        self._old_bytes = 0

    @property
    def capacity(self) -> int:
        """Entries of a usual size (a 32-character member_id) it can hold: its bound."""
        return min(2 * self._generation_entries,
                   2 * self._generation_bytes // (_ENTRY_OVERHEAD + 64))

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    @property
    def size_bytes(self) -> int:
        return self._young_bytes + self._old_bytes

    def forget_all(self) -> None:
        """PostgreSQL went back in history (a failover, a restore): what this worker stored may
        be gone, or another event may be at its position (`OfflineTrust.refresh`)."""
        self._young, self._old = {}, {}
        self._young_bytes = self._old_bytes = 0

    def remember(self, committed: Iterable[Committed]) -> None:
        if self._generation_entries == 0:
            return
        # an occurrence is stored once (the store's unique key), so it comes here once: no
        # membership test (were one to come twice, its bytes would be counted twice: safe)
        young, used = self._young, self._young_bytes
        entries, limit = self._generation_entries, self._generation_bytes
        for member_id, dedup_key, position, digest in committed:
            # a str stores 1, 2 or 4 bytes a character (and a longer header) once one is not
            # ASCII: a sender's member_id of four-byte characters, counted by length, took 1.5x
            # the bound (isascii reads a flag: O(1))
            weight = _ENTRY_OVERHEAD + len(dedup_key) + (
                len(member_id) if member_id.isascii() else 4 * len(member_id) + 24)
            if weight > limit:
                continue
            if len(young) >= entries or used + weight > limit:
                self._old, self._old_bytes = young, used
                young, used = {}, 0
                self._young = young
            young[(member_id, dedup_key)] = (position, digest)
            used += weight
        self._young_bytes = used

    def facts(self, wanted: Sequence[tuple[str, bytes]]) -> tuple[
        dict[tuple[str, bytes], int], dict[int, bytes]
    ]:
        """`Facts.seen` and `Facts.accepted` for these keys (those remembered)."""
        seen: dict[tuple[str, bytes], int] = {}
        accepted: dict[int, bytes] = {}
        young, old = self._young, self._old
        for key in wanted:
            found = young.get(key) or old.get(key)
            if found is None:
                continue
            position, digest = found
            seen[key] = position
            if digest is not None:
                accepted[position] = digest
        return seen, accepted

    def fill(self, facts: Facts, wanted: Sequence[tuple[str, bytes]]) -> Facts:
        """`facts` with the dedup facts remembered for these keys."""
        facts.seen, facts.accepted = self.facts(wanted)
        return facts
