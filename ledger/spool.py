"""Store-and-forward: when PostgreSQL is unreachable, verified drafts wait in a local file.

Bitrix24 never re-sends, so a 503 during a database restart would lose the event for good. The
spool is one append-only file of records, each fsync'd before the sender hears 2xx:

    record  = magic "LSP1" (4 bytes) ‖ length (uint32 BE) ‖ CRC-32 of body (uint32 BE) ‖ body
    body    = UTF-8 JSON of one draft, `ledger.codec`'s form of it plus
              {"v": <format version>, "kind": "event"|"rejection"}
              (records written before the version field existed are format 1, read the same way)

A second file, `drained`, holds (fsync'd) the offset up to which records are in PostgreSQL. Drained
records are appended again idempotently if a crash comes between COMMIT and that write (the dedup
key makes the second copy a duplicate). A record cut short or failing its CRC (power loss while
writing) is moved aside to `spool.corrupt-<time>` and reported — never stored.

A write that fails part-way (ENOSPC, EIO, a short write, a failed fsync) is undone — the file is
truncated back to the end of the last good record — before anything else is appended, and the
drafts are refused (`SpoolUnwritable`), never acknowledged. If the truncation fails too, the spool
is *broken*: it accepts nothing (each attempt first retries the repair) and `health()` says so.
Every file here is created 0600 and the directory is 0700: records hold payloads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import io
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ledger import codec
from ledger.errors import CodecError, SpoolBusy, SpoolFull, SpoolUnwritable
from ledger.models import Draft, EventDraft, RejectionDraft

log = logging.getLogger(__name__)

MAGIC = b"LSP1"
# of a record's body; 1 had no "v" field and is read the same way. Before 3, the offline judge
# spooled some deliveries it refused ("unjudged", judged on drain); since 3 every spooled event
# was accepted offline, and the drain may store one as judged then (`ledger.offline`'s `held`)
FORMAT = 3
_READABLE = {1, 2, 3}
_HEADER = struct.Struct(">4sII")
# how long a write, read or repair may hold the spool before readiness calls it stalled (an fsync
# takes milliseconds; a read of a full spool's search, `held_among`, about a second per 300 MiB)
STALLED_AFTER_SECONDS = 10.0
_KINDS: dict[str, type[EventDraft] | type[RejectionDraft]] = {
    "event": EventDraft, "rejection": RejectionDraft,
}


def encode(draft: Draft) -> bytes:
    """A record body; raises (TypeError) for a draft JSON cannot hold (e.g. a lone surrogate)."""
    kind = "event" if isinstance(draft, EventDraft) else "rejection"
    return orjson.dumps({"v": FORMAT, "kind": kind, **codec.to_json(draft)})


def decode(body: bytes) -> Draft:
    """The draft of a record body (any readable format); `CodecError` when it is none."""
    try:
        fields: dict[str, Any] = orjson.loads(body)
        version = fields.pop("v", 1)
        kind = fields.pop("kind")
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise CodecError(f"not a spool record: {exc}") from exc
    if version not in _READABLE or kind not in _KINDS:
        raise CodecError(f"spool record of format {version!r}, kind {kind!r}: not readable here")
    draft = codec.from_json(_KINDS[kind], fields)
    if (version < 3 and isinstance(draft, EventDraft) and draft.offline_seen is not None
            and not draft.offline_accepted):
        # perhaps refused offline and spooled unjudged: judged by PostgreSQL on drain, as when
        # it was written — never stored as judged offline
        draft = dataclasses.replace(draft, offline_seen=None)
    return draft


@dataclass(frozen=True)
class FileOps:
    """The calls the spool writes its log with. A test passes failing ones (ENOSPC at byte k, a
    short write, a truncate that fails) to show that a failed write is never acknowledged."""

    pwrite: Callable[[int, bytes, int], int] = os.pwrite
    fsync: Callable[[int], None] = os.fsync
    ftruncate: Callable[[int, int], None] = os.ftruncate


@dataclass(frozen=True)
class Pending:
    drafts: list[Draft]
    end: int  # offset just past the last of them
    start: int = 0
    unreadable: str | None = None  # why the record at `start` cannot be decoded (then no drafts)


@dataclass(frozen=True)
class Scanned:
    """What opening a spool found checking it, with the file it checked: a spool opened again
    with it (`Spool`'s `scanned`) is not read again while the file is the same one, unchanged —
    an adopted spool is opened every pass (`ledger.adoption`), and checking it took ~3 s per GiB
    against a 1-s pass."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    drained: int
    records: int
    oldest: datetime | None


class Spool:
    """One process's spool directory. One committer task owns it; a lock keeps the readiness
    check's repair attempts from interleaving with its writes."""

    def __init__(self, directory: Path, *, max_bytes: int, files: FileOps | None = None,
                 scanned: Scanned | None = None) -> None:
        """`scanned`: what an earlier opening of this directory's log found (`scanned()`); used
        instead of reading the log again when the file is still that one — same device, inode,
        size and modification time, drained up to the same offset — else the log is read."""
        _private_directory(directory)
        self.directory = directory
        self.max_bytes = max_bytes
        self._files = files or FileOps()
        self._lock = threading.Lock()
        self._holder: tuple[str, float, datetime] | None = None  # what holds it, since when
        self._log = directory / "spool.log"
        self._marker = directory / "drained"
        os.close(os.open(self._log, os.O_WRONLY | os.O_CREAT, 0o600))
        for path in directory.iterdir():  # files from before the modes were enforced
            if path.is_file():
                path.chmod(0o600)
        self.drained = self._read_marker()
        self.corrupt_found: list[Path] = []
        self.records = 0
        self.oldest: datetime | None = None
        self.broken: str | None = None  # a failed write that could not be undone
        self.failure: str | None = None  # the last write failed (undone); cleared by a good one
        if scanned is not None and scanned == self._scan_of(scanned.records, scanned.oldest):
            self.records, self.oldest = scanned.records, scanned.oldest
            self._size = scanned.size
        else:
            self._size = self._recover()

    def scanned(self) -> Scanned | None:
        """What is known of the log now, to open it again without reading it (`Scanned`);
        None when the log cannot be looked at. Call it while holding the spool's `owner.lock`
        (nobody else writes it then)."""
        with self._locked("look at the log"):
            return self._scan_of(self.records, self.oldest)

    def _scan_of(self, records: int, oldest: datetime | None) -> Scanned | None:
        try:
            found = os.stat(self._log)
        except OSError:
            return None
        return Scanned(found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns,
                       self.drained, records, oldest)

    @property
    def size(self) -> int:
        return self._size

    def has_pending(self) -> bool:
        return self._size > self.drained

    def age_seconds(self) -> float:
        if self.oldest is None or not self.has_pending():
            return 0.0
        return (datetime.now(UTC) - self.oldest).total_seconds()

    def health(self, *, stalled_after: float = STALLED_AFTER_SECONDS) -> str | None:
        """Why the spool cannot take a write now (None: it can). Retries a pending repair, and
        after a failed write probes the directory with one small fsync'd write.

        Never waits for the lock (readiness runs this in a thread per probe: a hung fsync
        parked one thread per probe until the pool ran dry). While another call holds it, the
        answer is from what is known: the last failure, or — held longer than `stalled_after`
        — stalled, naming the holder and since when."""
        if not self._lock.acquire(blocking=False):
            holder = self._holder
            if self.broken is not None:
                return self.broken
            if holder is not None:
                what, began, at = holder
                held = time.monotonic() - began
                if held > stalled_after:
                    return (f"stalled: its {what} has held it since {at.isoformat()} "
                            f"({held:.1f} s; a hung disk or fsync?)")
            return None if self.failure is None else f"its last write failed: {self.failure}"
        try:
            self._holder = ("readiness check", time.monotonic(), datetime.now(UTC))
            if self.broken is not None and not self._undo():
                return self.broken
            if self.failure is not None and self._probe():
                self.failure = None
            return None if self.failure is None else f"its last write failed: {self.failure}"
        finally:
            self._holder = None
            self._lock.release()

    @contextlib.contextmanager
    def _locked(self, what: str) -> Iterator[None]:
        """The lock, noting who holds it since when (for `health`, which never waits for it)."""
        with self._lock:
            self._holder = (what, time.monotonic(), datetime.now(UTC))
            try:
                yield
            finally:
                self._holder = None

    def append(self, drafts: list[Draft], *, past_limit: bool = False) -> None:
        """Write and fsync, or raise writing nothing: `SpoolFull` past the limit (unless
        `past_limit`: a batch whose online append may have committed, `ledger.offline.Doubt` —
        its spooled copy is what settles that doubt), `SpoolUnwritable` when the write failed
        (undone) or the spool is broken."""
        blob = b"".join(self._record(encode(d)) for d in drafts)
        with self._locked("append"):
            if self.broken is not None and not self._undo():
                raise SpoolUnwritable(f"the spool accepts nothing: {self.broken}")
            if self._size + len(blob) > self.max_bytes and not past_limit:
                raise SpoolFull(
                    f"the spool in {self.directory} holds {self._size} bytes, its limit is "
                    f"{self.max_bytes}: PostgreSQL must come back (or LEDGER_SPOOL_MAX_BYTES grow)"
                )
            try:
                self._write_at(self._size, blob)
            except OSError as exc:
                self.failure = f"{exc} (writing {len(blob)} bytes to {self._log})"
                undone = self._undo()
                log.error("spool write failed (%s); %s", exc,
                          "undone" if undone else f"NOT undone: {self.broken}")
                raise SpoolUnwritable(
                    f"the delivery could not be written to the spool ({exc}); it was not taken"
                ) from exc
            self.failure = None
            if not self.has_pending():
                self.oldest = drafts[0].received_at if drafts else None
            self._size += len(blob)
            self.records += len(drafts)

    def read(self, limit: int) -> Pending:
        """Up to `limit` undrained drafts, in order — or, when the first of them cannot be
        decoded, none and the reason (the caller sets that record aside)."""
        drafts: list[Draft] = []
        with self._locked("read"), self._log.open("rb") as handle:
            handle.seek(self.drained)
            offset = self.drained
            while len(drafts) < limit and offset < self._size:
                header = handle.read(_HEADER.size)
                _, length, _ = _HEADER.unpack(header)
                end = offset + _HEADER.size + length
                try:
                    drafts.append(decode(handle.read(length)))
                except CodecError as exc:
                    if drafts:
                        break  # read up to it; it comes first next time
                    return Pending([], end, offset, unreadable=str(exc))
                offset = end
        return Pending(drafts, offset, self.drained)

    def held_among(self, wanted: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Of `wanted` ((portal, dedup key hex) pairs: the offline trust journal's open entries
        of this spool, `ledger.offline`'s `settle_lost`), those an undrained event record that
        can be read still holds. Reads the whole undrained log a record at a time, keeping only
        what was asked for (an adopted spool may be huge); called only after records were set
        aside."""
        found: set[tuple[str, str]] = set()
        with self._locked("search of the log"), self._log.open("rb") as handle:
            handle.seek(self.drained)
            offset = self.drained
            while offset < self._size and len(found) < len(wanted):
                _, length, _ = _HEADER.unpack(handle.read(_HEADER.size))
                body = handle.read(length)
                offset += _HEADER.size + length
                try:
                    draft = decode(body)
                except CodecError:
                    continue  # set aside in its turn
                if isinstance(draft, EventDraft):
                    key = (draft.member_id, draft.dedup_key.hex())
                    if key in wanted:
                        found.add(key)
        return found

    def mark_drained(self, pending: Pending) -> None:
        """Record (durably) that these drafts are in PostgreSQL; empty the files when all are."""
        with self._locked("drained marker"):
            self._mark_drained(pending)

    def quarantine(self, pending: Pending, reason: str) -> Path:
        """Set aside records PostgreSQL will not take (or that cannot be read), byte for byte,
        so the ones after them can drain."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        aside = self.directory / f"spool.refused-{stamp}"
        with self._locked("quarantine"):
            with self._log.open("rb") as handle:
                handle.seek(pending.start)
                _write_private(aside, handle.read(pending.end - pending.start))
            log.error("spooled deliveries refused (%s): kept in %s", reason, aside)
            self._mark_drained(pending)
        return aside

    # ---- file handling --------------------------------------------------------------------

    @staticmethod
    def _record(body: bytes) -> bytes:
        return _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body

    def _mark_drained(self, pending: Pending) -> None:
        self.records -= len(pending.drafts) if pending.unreadable is None else 1
        if pending.end >= self._size:
            # marker first: a crash between the two re-drains (idempotently), never skips
            self._write_marker(0)
            with self._log.open("r+b") as handle:
                handle.truncate(0)
                os.fsync(handle.fileno())
            self._size = self.drained = 0
            self.records, self.oldest = 0, None
            return
        self.drained = pending.end
        self._write_marker(pending.end)
        self.oldest = pending.drafts[-1].received_at if pending.drafts else self.oldest

    def _write_at(self, offset: int, blob: bytes) -> None:
        """All of `blob` at `offset`, fsync'd — or OSError, with any part of it possibly there."""
        fd = os.open(self._log, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = memoryview(blob)
            while view:
                written = self._files.pwrite(fd, bytes(view), offset)
                if written <= 0:
                    raise OSError(errno.EIO, f"short write: {written} of {len(view)} bytes")
                view, offset = view[written:], offset + written
            self._files.fsync(fd)
        finally:
            os.close(fd)

    def _undo(self) -> bool:
        """Truncate the log back to its last good record; on failure mark the spool broken."""
        try:
            fd = os.open(self._log, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                self._files.ftruncate(fd, self._size)
                self._files.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.broken = (
                f"{self._log} may hold a torn record past offset {self._size} that could not be "
                f"truncated ({exc}): free space or fix the disk; the spool retries by itself"
            )
            return False
        if self.broken is not None:
            log.warning("spool %s repaired: truncated back to offset %d", self._log, self._size)
        self.broken = None
        return True

    def _probe(self) -> bool:
        """Whether one small write can be made durable in the spool directory now."""
        probe = self.directory / "spool.probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if self._files.pwrite(fd, b"probe", 0) != len(b"probe"):
                    return False
                self._files.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError:
            return False
        return True

    def _read_marker(self) -> int:
        try:
            return int(self._marker.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _write_marker(self, offset: int) -> None:
        temporary = self._marker.with_suffix(".tmp")
        _write_private(temporary, str(offset).encode())
        temporary.replace(self._marker)

    def _recover(self) -> int:
        """Check every undrained record; move a corrupt or torn tail aside and report it.

        Reads one record at a time (and copies a torn tail in chunks): a worker adopting an
        absent worker's spool opens it every pass (`ledger.adoption`), and that spool may be
        as large as any limit it was written under — memory stays a record's size."""
        with self._log.open("rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            if self.drained > end:  # cannot be drained past the end: trust the records
                log.warning("spool %s: drained offset %d beyond its end %d; draining it all "
                            "again", self._log, self.drained, end)
                self.drained = 0
            offset = self.drained
            handle.seek(offset)
            while offset < end:
                header = handle.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    break
                magic, length, crc = _HEADER.unpack(header)
                if magic != MAGIC or offset + _HEADER.size + length > end:
                    break
                body = handle.read(length)
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                if self.oldest is None:
                    try:
                        self.oldest = decode(body).received_at
                    except CodecError:  # intact but unreadable: draining sets it aside
                        self.oldest = datetime.now(UTC)
                self.records += 1
                offset += _HEADER.size + length
            if offset < end:
                # to the microsecond: two torn tails within a second kept only the last
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
                aside = self.directory / f"spool.corrupt-{stamp}"
                handle.seek(offset)
                _copy_private(handle, aside)
        if offset < end:
            with self._log.open("r+b") as handle:
                handle.truncate(offset)
                os.fsync(handle.fileno())
            self.corrupt_found.append(aside)
            log.error(
                "spool %s: %d bytes at offset %d are torn or corrupt (a crash while writing?); "
                "moved to %s and NOT stored — inspect it",
                self._log, end - offset, offset, aside,
            )
        return offset


def any_pending(root: Path) -> bool:
    """Whether any worker's spool under `root` (`worker-*`) holds records not yet drained —
    read-only, from the file sizes and drained markers, also for workers that are down."""
    for directory in root.glob("worker-*"):
        try:
            size = (directory / "spool.log").stat().st_size
        except FileNotFoundError:
            continue
        try:
            drained = int((directory / "drained").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            drained = 0
        if size > drained:
            return True
    return False


# ---- who drains a spool ------------------------------------------------------------------
#
# A spool has one drainer at a time: the process holding `owner.lock` (an exclusive `flock`,
# let go by the kernel when its holder dies, kill -9 included). A worker takes its own spool's
# lock at start-up, before it reads the spool, and keeps it while it runs; a running worker
# takes the lock of a spool whose worker number no process runs (`ledger.adoption`) for one
# drain pass at a time. Whoever holds it says so in the file (`{"worker": N, "pid": P}`), for
# the others' reports: a spool held by a worker of another number is adopted, its own worker
# absent.

LOCK_NAME = "owner.lock"
_CLAIM_POLL_SECONDS = 0.05


def worker_of(directory: Path) -> int | None:
    """The worker number of a spool directory (`worker-N`), None for anything else."""
    prefix, _, number = directory.name.partition("-")
    return int(number) if prefix == "worker" and number.isdigit() else None


def claim(directory: Path, *, holder: int) -> int | None:
    """Take `directory`'s lock without waiting: its descriptor (close it to let go), or None
    when a process holds it."""
    _private_directory(directory)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, orjson.dumps({"worker": holder, "pid": os.getpid()}), 0)
    except OSError as exc:  # only a report for the others: the lock is what counts
        log.warning("cannot note the holder of %s (%s)", directory / LOCK_NAME, exc)
    return fd


async def claim_own(directory: Path, *, worker: int, seconds: float) -> int:
    """A worker's own spool lock, waited for without a thread: polled. `SpoolBusy` when a
    process of this worker number (a second `ledger serve` on the same data directory) or an
    unknown one still holds it after `seconds`. A running worker of another number holds it
    for an adoption pass (`ledger.adoption`): then this one keeps waiting — logged every
    `seconds`, naming it — for the pass ends by itself and exiting would not end it sooner
    (it exited after 60 s: a pass stalled on a hung disk, or the first check of a huge spool,
    ended `serve` instead). The HTTP server starts once the lock is taken: until then a
    readiness probe is refused, as for any worker still starting."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadline = began + seconds
    reread = False
    while (fd := claim(directory, holder=worker)) is None:
        if loop.time() >= deadline:
            holder = holder_of(directory)
            if (holder is None or holder["worker"] == worker) and not reread:
                # a holder notes itself just after taking the lock (truncate, then write): read
                # in that instant, the note is empty or the previous holder's — this worker's
                # own number from its last life. Read again a poll later before judging.
                reread = True
                await asyncio.sleep(_CLAIM_POLL_SECONDS)
                continue
            reread = False
            if holder is None or holder["worker"] == worker:
                raise SpoolBusy(
                    f"the spool {directory} is held by another process ({holder or 'unknown'})"
                    f" after {seconds:g} s: is a second `ledger serve` running on the same data "
                    "directory? Stop it (one process drains a spool), then start this one "
                    "again")
            log.warning(
                "worker %d's spool %s has been held for %.0f s by worker %d (pid %d), which "
                "adopted it while this number was absent; waiting for its pass to end (this "
                "worker serves nothing until then). Held this long, that process is likely "
                "stalled (a hung disk?): see its log, or end it — what its pass was draining "
                "is drained again, idempotently", worker, directory, loop.time() - began,
                holder["worker"], holder["pid"])
            deadline = loop.time() + seconds
        await asyncio.sleep(_CLAIM_POLL_SECONDS)
    if loop.time() - began >= seconds:
        log.warning("worker %d's spool %s taken after %.0f s", worker, directory,
                    loop.time() - began)
    return fd


def holder_of(directory: Path) -> dict[str, int] | None:
    """Who last took `directory`'s lock, as it noted (None: unknown)."""
    try:
        noted = orjson.loads((directory / LOCK_NAME).read_bytes())
        return {"worker": int(noted["worker"]), "pid": int(noted["pid"])}
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def undrained(directory: Path) -> tuple[int, datetime | None]:
    """Bytes not yet drained in a spool directory and when its first undrained delivery was
    received (None: none, or unreadable) — read-only, without its lock (for reports)."""
    log_path = directory / "spool.log"
    try:
        size = log_path.stat().st_size
    except FileNotFoundError:
        return 0, None
    try:
        drained = int((directory / "drained").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        drained = 0
    if size <= drained:
        return 0, None
    oldest: datetime | None = None
    try:
        with log_path.open("rb") as handle:
            handle.seek(drained)
            _, length, _ = _HEADER.unpack(handle.read(_HEADER.size))
            oldest = decode(handle.read(length)).received_at
    except (OSError, struct.error, CodecError):
        pass
    return size - drained, oldest


def _private_directory(directory: Path) -> None:
    """The spool directory (and any parent it creates) readable by this user only."""
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (directory, *missing):
        path.chmod(0o700)


_COPY_CHUNK = 1024 * 1024


def _copy_private(source: BinaryIO, path: Path) -> None:
    """Copy the rest of `source` into a file only this user can read (fsync'd), a chunk at a
    time."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        while chunk := source.read(_COPY_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    """Write and fsync a file only this user can read."""
    _copy_private(io.BytesIO(data), path)
