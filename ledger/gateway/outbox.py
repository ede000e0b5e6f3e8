"""The local outbox: bodies waiting to be forwarded, encrypted at rest, deleted once settled.

A forwarded body still holds the portal's `application_token` and OAuth tokens (the app needs
them), so it never goes to PostgreSQL or a log: only here, encrypted with AES-GCM (a random
96-bit nonce per record, the frame header as associated data), and in memory.

Two processes share it. The intake (`OutboxWriter`, one per worker process and directory)
only appends; the forwarder process (`OutboxReader`, one for all directories) tails what was
appended, forwards it, writes down what was settled and deletes what is no longer owed.

Layout (one directory per worker process):
- `seg-<n>.log`: frames `"LOB1"` ‖ uint32 length ‖ nonce ‖ AES-GCM(JSON header ‖ "\\n" ‖ body),
  written (to the kernel) before the delivery is answered, so a killed process loses none; they
  are fsync'd in the background every `sync_interval` (waiting for an fsync per batch would halve
  intake throughput: bench/RESULTS.md), so an OS crash or power loss may lose the forwards of
  that last interval. A frame is known by (segment, offset). Segment numbers never repeat
  (nanoseconds at creation), and a writer never appends to a segment it did not create, so a
  torn tail left by a killed writer stays a tail.
- `writer.lock`: each writer holds a shared `flock` on it for as long as it is open (taken
  before its first commit is appended), so the forwarder can tell a directory whose writer is
  gone (`writer_gone`: an earlier run with more workers) from a live one.
- `done.log` (the forwarder's): one plaintext line `<segment> <offset> <route> <outcome>` per
  forward settled (delivered or given up); not fsync'd — losing a line only means that forward
  is sent again (at least once). Rewritten at the forwarder's start to what still matters.

Deleting a segment while its writer may still append to it: both sides take `flock` on the
segment file — the writer around each append, the reader around the check that nothing new was
written and the `unlink`. A writer that finds its file unlinked (`st_nlink == 0`) starts a new
segment before writing.

Key: `LEDGER_OUTBOX_KEY` (base64 of 32 bytes) or `LEDGER_DATA_DIR/keys/outbox.key`, created
0600 on first use — never while an outbox holds records no key at hand opens (a lost key:
`OutboxKeyLost`, see `load_key`). Retired keys (`rotate_key`: `keys/outbox-retired-<n>.key`,
0400) still open what they sealed. Without the key, the files are noise; a segment none of
whose records opens is set aside by the reader (`OutboxReader.unreadable`): not read on, not
deleted, reported — the other segments and directories go on.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.errors import OutboxError, OutboxKeyLost

log = logging.getLogger(__name__)

MAGIC = b"LOB1"
_FRAME = struct.Struct(">4sI")
_NONCE = 12
KEY_NAME = "outbox.key"
RETIRED_GLOB = "outbox-retired-*.key"  # see rotate_key
KEY_LOST = "outbox_key_lost"  # the reason recorded for forwards given up with their key
_PROBE_BYTES = 256 * 1024  # how much of a segment's start tells which key sealed it
_PROBE_MAX = 64 * 1024**2  # or the whole of its first record, up to this
IDLE_SECONDS = 1.0  # see OutboxReader._delete_if_done
WRITER_LOCK = "writer.lock"

Location = tuple[int, int]  # (segment, offset)


def _decoded(data: bytes, what: str) -> bytes:
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except ValueError as exc:
        raise OutboxError(f"{what} is not base64") from exc
    if len(key) != 32:
        raise OutboxError(f"{what} must be 32 bytes, base64-encoded")
    return key


def load_key(
    path: Path, configured: str | None, *, outbox_root: Path | None = None,
    retired: Sequence[bytes] = (),
) -> bytes:
    """The outbox key from the setting, else from `path` (created, 0600, when missing).

    Never created while an outbox under `outbox_root` holds records no key at hand opens
    (`retired`: earlier keys still kept): a new key would make those forwards unreadable for
    good and stop the forwarder at each start — `OutboxKeyLost` says what to do instead."""
    if configured:
        return _decoded(configured.encode(), "LEDGER_OUTBOX_KEY")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lost = (unreadable_segments(outbox_root, retired)
            if outbox_root is not None and not path.exists() else [])
    if lost and not path.exists():  # (made meanwhile by another process: its records, then)
        directories = sorted({p.parent.name for p in lost})
        raise OutboxKeyLost(
            f"{path} is missing, but {len(lost)} outbox segment(s) in {outbox_root} "
            f"({', '.join(directories)}) hold records sealed under a key: no new key is "
            "created. Restore the key file (or set LEDGER_OUTBOX_KEY to the key they were "
            "written with), or give those forwards up with `ledger forward "
            f"--give-up-unreadable --yes` (each is recorded as given up, reason {KEY_LOST}) "
            "and start again")
    if not path.exists():
        # written aside, then linked into place: workers starting together all get one key
        _write_key(path, AESGCM.generate_key(bit_length=256))
    return _decoded(path.read_bytes(), str(path))


def _write_key(path: Path, key: bytes) -> None:
    """Put a new key file in place unless one exists (another process was first: its key)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(base64.b64encode(key) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    _fsync_directory(path.parent)


def retired_keys(keys_dir: Path) -> list[bytes]:
    """Keys retired by `rotate_key`, newest first: read only, to open records sealed before
    the rotation until they are settled."""
    return [_decoded(p.read_bytes(), str(p))
            for p in sorted(keys_dir.glob(RETIRED_GLOB), reverse=True)]


def rotate_key(keys_dir: Path) -> Path:
    """Retire `keys/outbox.key` (kept, read only, as `outbox-retired-<ns>.key`) and put a new
    one in its place; processes started from now on seal with the new key, and the forwarder
    opens records under either. Returns the retired key's path."""
    current = keys_dir / KEY_NAME
    if not current.exists():
        raise OutboxError(f"{current} does not exist: there is no key to rotate (a key set by "
                          "LEDGER_OUTBOX_KEY is rotated by changing the setting and keeping "
                          "the old value in a retired key file, outbox-retired-<n>.key)")
    retired = keys_dir / f"outbox-retired-{time.time_ns():020d}.key"
    os.link(current, retired)  # the old key is never without a name
    os.chmod(retired, 0o400)
    temporary = current.with_name(f"{current.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(current)
    _fsync_directory(keys_dir)
    return retired


def _opens(path: Path, sealer: _Sealer) -> bool | None:
    """Whether the records at the start of a segment open with the sealer's keys: True if any
    does, False if none of at least one complete record does, None if there is none."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_PROBE_BYTES)
            if len(data) >= _FRAME.size and data.startswith(MAGIC):  # a first record larger
                missing = _FRAME.size + _FRAME.unpack_from(data)[1] - len(data)  # than that
                if 0 < missing <= _PROBE_MAX:
                    data += handle.read(missing)
    except FileNotFoundError:
        return None
    offset, seen = 0, False
    while (offset := data.find(MAGIC, offset)) >= 0 and offset + _FRAME.size <= len(data):
        end = offset + _FRAME.size + _FRAME.unpack_from(data, offset)[1]
        if end <= len(data):
            seen = True
            try:
                sealer.open(data[offset:end])
            except OutboxError:
                offset += 1
                continue
            return True
        offset += 1
    return False if seen else None


def unreadable_segments(root: Path, keys: Sequence[bytes]) -> list[Path]:
    """The outbox segments under `root` holding records none of `keys` opens (judged by the
    records at each one's start). Blocking I/O."""
    sealer = _Sealer(keys, root)
    return [_segment_path(d, n) for d in sorted(root.glob("worker-*")) if d.is_dir()
            for n in _segment_numbers(d) if _opens(_segment_path(d, n), sealer) is False]


def idle_retired_keys(keys_dir: Path, root: Path) -> list[Path]:
    """Retired key files no outbox segment under `root` holds records of (any more). Deleting
    one is the operator's call: an intake started before the rotation and not restarted since
    still seals with it. Blocking I/O."""
    segments = [_segment_path(d, n) for d in root.glob("worker-*") if d.is_dir()
                for n in _segment_numbers(d)]
    idle = []
    for path in sorted(keys_dir.glob(RETIRED_GLOB)):
        sealer = _Sealer([_decoded(path.read_bytes(), str(path))], root)
        if not any(_opens(segment, sealer) for segment in segments):
            idle.append(path)
    return idle


def frames(path: Path) -> list[int]:
    """The offsets of the complete records in a segment, by their plaintext framing alone
    (no key needed: to count what cannot be opened). Blocking I/O."""
    found: list[int] = []
    data = path.read_bytes()
    offset = 0
    while offset + _FRAME.size <= len(data):
        magic, length = _FRAME.unpack_from(data, offset)
        end = offset + _FRAME.size + length
        if magic != MAGIC or end > len(data):
            resumed = data.find(MAGIC, offset + 1)
            if resumed < 0:
                break
            offset = resumed
            continue
        found.append(offset)
        offset = end
    return found


class _Sealer:
    def __init__(self, keys: bytes | Sequence[bytes], directory: Path) -> None:
        """`keys[0]` seals; each opens (the one that opened last tried first)."""
        self._aeads = [AESGCM(k) for k in ([keys] if isinstance(keys, bytes) else keys)]
        self._directory = directory

    def seal(self, header: dict[str, Any], body: bytes, nonce: bytes | None = None) -> bytes:
        """One frame; `nonce`: 12 random bytes (drawn here when not given)."""
        nonce = nonce or os.urandom(_NONCE)
        sealed = self._aeads[0].encrypt(nonce, orjson.dumps(header) + b"\n" + body, MAGIC)
        return _FRAME.pack(MAGIC, _NONCE + len(sealed)) + nonce + sealed

    def open(self, frame: bytes) -> tuple[dict[str, Any], bytes]:
        nonce = frame[_FRAME.size : _FRAME.size + _NONCE]
        sealed = frame[_FRAME.size + _NONCE :]
        for index, aead in enumerate(aeads := self._aeads):
            try:
                plain = aead.decrypt(nonce, sealed, MAGIC)
            except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
                continue
            if index:  # records come in runs under one key; a new list: threads read it
                self._aeads = [aead, *(a for a in aeads if a is not aead)]
            header, _, body = plain.partition(b"\n")
            return orjson.loads(header), body
        raise OutboxError(
            f"an outbox record in {self._directory} does not decrypt: the outbox key is "
            "not the one it was written with (restore LEDGER_OUTBOX_KEY or keys/outbox.key, "
            "or give its forwards up: `ledger forward --give-up-unreadable --yes`)")


def _segment_path(directory: Path, number: int) -> Path:
    return directory / f"seg-{number:020d}.log"


def _segment_numbers(directory: Path) -> list[int]:
    numbers = []
    for path in directory.glob("seg-*.log"):
        with contextlib.suppress(ValueError):
            numbers.append(int(path.stem[4:]))
    return sorted(numbers)


def writer_gone(directory: Path) -> bool:
    """Whether no `OutboxWriter` (in any process) has `directory` open: then nothing more can
    be appended there until one opens it again. Blocking I/O (call it from a thread)."""
    try:
        handle = os.open(directory / WRITER_LOCK, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(handle)  # releases what was taken
    return True


def outbox_bytes(root: Path) -> int:
    """What every worker's outbox under `root` holds on disk, in bytes (its segments; the
    intake bounds it: `LEDGER_OUTBOX_MAX_BYTES`). Blocking I/O (call it from a thread)."""
    total = 0
    for path in root.glob("worker-*/seg-*.log"):
        with contextlib.suppress(OSError):  # deleted meanwhile by the forwarder
            total += path.stat().st_size
    return total


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # make a new file's name durable too
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


class OutboxWriter:
    """The intake's side: append sealed records, fsync in the background. Blocking file I/O
    (call it from a thread); safe to use from several threads."""

    def __init__(self, directory: Path, key: bytes, *, segment_bytes: int = 8 * 1024**2) -> None:
        self.directory = directory
        self._sealer = _Sealer(key, directory)
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._file: Any = None
        self._size = 0
        self._last = 0
        self._unsynced = False
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # held while open: the forwarder's `writer_gone` (it waits out a probe's instant)
        self._alive: int | None = os.open(directory / WRITER_LOCK, os.O_RDONLY | os.O_CREAT,
                                          0o600)
        fcntl.flock(self._alive, fcntl.LOCK_SH)
        self._last = max(_segment_numbers(directory), default=0)

    def append(self, records: list[tuple[dict[str, Any], bytes]]) -> None:
        """Write records (header, body) to the kernel (not fsync'd: see `sync`)."""
        self.write(self.seal(records))

    def seal(self, records: list[tuple[dict[str, Any], bytes]]) -> bytes:
        """The frames of records (header, body), for `write` or `write_now`. No I/O."""
        nonces = os.urandom(_NONCE * len(records))  # one system call for the batch
        return b"".join(self._sealer.seal(h, b, nonces[i * _NONCE : (i + 1) * _NONCE])
                        for i, (h, b) in enumerate(records))

    def write(self, data: bytes) -> None:
        """Write sealed frames to the kernel (not fsync'd: see `sync`); may wait on the disk
        (a new segment is fsync'd into place) or on the other calls here."""
        with self._lock:
            if self._file is None or self._size > self._segment_bytes:
                self._rotate()
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            if os.fstat(self._file.fileno()).st_nlink == 0:  # the forwarder deleted it
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
                self._rotate()
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            self._put(self._file, data)

    def write_now(self, data: bytes) -> bool:
        """`write`, but only if nothing can make it wait: no other call here under way (an
        fsync), the current segment open and not due to be rotated, and its lock free (the
        forwarder's reader takes it to delete the segment). False (nothing written) if
        anything would wait: then call `write`, from a thread. This lets the intake's event
        loop append a batch itself (a write to the page cache; a thread's round trip cost
        ~50 µs of CPU per batch) without blocking on a lock held by a niced process, on an
        fsync or on a new segment's fsync'd creation."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            file = self._file
            if file is None or self._size > self._segment_bytes:
                return False
            descriptor = file.fileno()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if os.fstat(descriptor).st_nlink == 0:  # deleted: a new segment, by `write`
                fcntl.flock(descriptor, fcntl.LOCK_UN)
                return False
            self._put(file, data)
            return True
        finally:
            self._lock.release()

    def _put(self, file: Any, data: bytes) -> None:
        """Append `data` to the segment whose flock the caller took, and let the lock go.
        Whole or not at all: a write that fails part-way (ENOSPC, EIO, EFBIG) is cut back off
        and the segment is closed, so the next write starts a new one. The segment file is
        unbuffered: a buffered writer kept what it could not write and wrote it with the next
        batch — a batch reported lost (given up) was forwarded after all — and a batch larger
        than its buffer left a torn frame *between* complete ones, which every later poll took
        for a record under another key (OutboxError): that writer's forwards stopped for good.
        A reader that saw complete frames of the failed batch before the cut sent them; they
        stay recorded as given up (a rare double account, never a loss)."""
        descriptor = file.fileno()
        view = memoryview(data)
        try:
            while view:
                written = file.write(view)
                if not written:  # never for a regular file; were it so, not a busy loop
                    raise OSError(errno.EIO, "the outbox segment took no bytes")
                view = view[written:]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, self._size)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
            # a reader may have read past the cut: nothing more is appended here
            with contextlib.suppress(OSError):
                if self._unsynced:
                    os.fsync(descriptor)
            file.close()
            self._file = None
            self._unsynced = False
            raise
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        self._size += len(data)
        self._unsynced = True

    def _rotate(self) -> None:
        if self._file is not None:
            if self._unsynced:
                os.fsync(self._file.fileno())
            self._file.close()
        self._last = max(time.time_ns(), self._last + 1)
        # unbuffered: see `_put`
        self._file = open(_segment_path(self.directory, self._last), "ab",  # noqa: SIM115
                          buffering=0)
        self._size = 0
        _fsync_directory(self.directory)

    def sync(self) -> None:
        """fsync what was written since the last call."""
        with self._lock:
            if self._unsynced and self._file is not None:
                os.fsync(self._file.fileno())
            self._unsynced = False

    @property
    def unsynced(self) -> bool:
        return self._unsynced

    def close(self) -> None:
        self.sync()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._alive is not None:
                os.close(self._alive)  # and with it the lock: this writer is gone
                self._alive = None


@dataclass(slots=True)
class Recovered:
    """A record read from the outbox, with the routes it still owes."""

    location: Location
    header: dict[str, Any]
    body: bytes | None  # None: not kept in memory (read back when its turn comes)
    routes: list[str]


@dataclass(slots=True)
class _Segment:
    read: int = 0  # bytes read (complete frames, or a torn tail skipped)
    outstanding: int = 0
    settled: set[tuple[int, str]] = field(default_factory=set)
    # a record decrypted here: the key is this segment's, so one that does not is damaged
    keyed: bool = False
    # its size when none of its records opened (sealed under a key this process does not
    # hold): set aside, read again only once it grows, never deleted (`OutboxReader.unreadable`)
    foreign: int | None = None
    foreign_until: float = 0.0  # monotonic: grown meanwhile, it is read again after this


def _still_aside(segment: _Segment, size: int) -> bool:
    """A segment set aside as under another key, not grown since (or read again too lately)."""
    return segment.foreign is not None and (
        size == segment.foreign or time.monotonic() < segment.foreign_until)


class OutboxReader:
    """The forwarder's side of one directory: tail new records, settle, delete. Blocking file
    I/O (call it from a thread); `settle` only notes, so the event loop may call it."""

    def __init__(self, directory: Path, key: bytes, *, retired: Sequence[bytes] = ()) -> None:
        """`retired`: earlier keys (`rotate_key`), to open records sealed before a rotation."""
        self.directory = directory
        self._sealer = _Sealer([key, *retired], directory)
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._done_file: Any = None
        self._settled: list[tuple[Location, str, str]] = []
        self._settled_lock = threading.Lock()  # never held during I/O
        self.behind = False  # the last poll stopped at its `max_bytes`: more to read

    def open(self) -> None:
        """Read `done.log` and rewrite it to what still matters (existing segments)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = set(_segment_numbers(self.directory))
        path = self.directory / "done.log"
        if path.exists():
            for line in path.read_text("ascii", "replace").splitlines():
                parts = line.split(" ")
                if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
                    number = int(parts[0])
                    if number in existing:
                        self._segments.setdefault(number, _Segment()).settled.add(
                            (int(parts[1]), parts[2]))
        self._rewrite_done()

    def _rewrite_done(self) -> None:
        """`done.log` cut to the segments that still exist (lines of deleted ones are dead)."""
        path = self.directory / "done.log"
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", encoding="ascii") as handle:
            for number, segment in sorted(self._segments.items()):
                for offset, route in sorted(segment.settled):
                    handle.write(f"{number} {offset} {route} settled\n")
            handle.flush()
            os.fsync(handle.fileno())
        # closed only once its replacement is written: a rewrite that fails (disk full) left
        # it closed, and every later `apply_settled` raised ValueError
        if self._done_file is not None:
            with contextlib.suppress(OSError):  # its lines are all in the replacement
                self._done_file.close()
        temporary.replace(path)
        self._done_file = open(path, "a", encoding="ascii")  # noqa: SIM115 - kept open

    def poll(self, max_bytes: int = 16 * 1024**2) -> list[Recovered]:
        """Records appended since the last call, oldest first, with what they still owe. Stops
        after the segment that brings what it read past `max_bytes` (a backlog of hours after
        an outage is read a piece per call, not into memory at once)."""
        found: list[Recovered] = []
        numbers = _segment_numbers(self.directory)
        taken = 0
        with self._lock:
            self.behind = False
            for number in set(self._segments) - set(numbers):  # set aside by an operator
                if self._segments[number].foreign is not None:
                    del self._segments[number]
            for index, number in enumerate(numbers):
                if taken >= max_bytes:
                    self.behind = True
                    break
                segment = self._segments.setdefault(number, _Segment())
                path = _segment_path(self.directory, number)
                try:
                    size = path.stat().st_size
                    if size <= segment.read or _still_aside(segment, size):
                        continue
                    taken += size - segment.read
                    with open(path, "rb") as handle:
                        handle.seek(segment.read)
                        data = handle.read(size - segment.read)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # raised, it dropped what this poll had read
                    log.error("outbox %s: %s (read again at the next poll)", path, exc)
                    self.behind = True
                    break
                offset = 0
                foreign = False
                while offset + _FRAME.size <= len(data):
                    magic, length = _FRAME.unpack_from(data, offset)
                    end = offset + _FRAME.size + length
                    at = segment.read + offset
                    if magic != MAGIC or end > len(data):
                        # a tail still being written, or torn — unless a record follows:
                        # then these bytes were damaged on disk
                        if (resumed := self._next_record(data, offset + 1)) is None:
                            break
                        log.error("outbox %s: %d bytes at offset %d are not a record (damaged "
                                  "on disk): skipped up to the next record, forwards lost",
                                  path, resumed - offset, at)
                        offset = resumed
                        continue
                    try:
                        header, body = self._sealer.open(data[offset:end])
                    except OutboxError:
                        resumed = self._next_record(data, offset + 1)
                        if not segment.keyed and resumed is None:
                            # nothing opens: sealed under a key this process does not hold.
                            # Set aside (not read on, not deleted), the other segments and
                            # directories go on: `unreadable` reports it
                            foreign = True
                            break
                        log.error("outbox %s: the record at offset %d does not decrypt while "
                                  "others do (damaged on disk): skipped, its forwards are lost",
                                  path, at)
                        offset = end if resumed is None else resumed
                        continue
                    segment.keyed = True
                    owed = [r for r in header["routes"] if (at, r) not in segment.settled]
                    segment.outstanding += len(owed)
                    if owed:
                        found.append(Recovered((number, at), header, body, owed))
                    offset = end
                if foreign:  # (a live writer under another key: not re-read at every poll)
                    segment.foreign, segment.foreign_until = size, time.monotonic() + 5.0
                    continue
                segment.foreign = None
                segment.read += offset
                if offset < len(data) and index < len(numbers) - 1:
                    # its writer moved on (or died): never completed, so never acknowledged
                    log.warning("outbox %s: skipping a torn tail of %d bytes", path,
                                len(data) - offset)
                    segment.read += len(data) - offset
        return found

    def _next_record(self, data: bytes, start: int) -> int | None:
        """The offset of the first complete record in `data` from `start` on that decrypts
        (authenticated: damaged bytes never pass for one), if any. Only called on damage or
        on a tail still being written, so the scan costs nothing otherwise."""
        while (offset := data.find(MAGIC, start)) >= 0:
            if offset + _FRAME.size > len(data):
                return None
            end = offset + _FRAME.size + _FRAME.unpack_from(data, offset)[1]
            if end <= len(data):
                with contextlib.suppress(OutboxError):
                    self._sealer.open(data[offset:end])
                    return offset
            start = offset + 1
        return None

    def read(self, location: Location) -> bytes:
        """A record's body (for a forward whose body was not kept in memory)."""
        number, offset = location
        with open(_segment_path(self.directory, number), "rb") as handle:
            handle.seek(offset)
            magic, length = _FRAME.unpack(handle.read(_FRAME.size))
            frame = _FRAME.pack(magic, length) + handle.read(length)
        return self._sealer.open(frame)[1]

    def settle(self, location: Location, route_id: str, outcome: str) -> None:
        """One forward is over (delivered or given up). Only noted here — no I/O, so the event
        loop may call it; `apply_settled` (from a thread) writes it down."""
        with self._settled_lock:
            self._settled.append((location, route_id, outcome))

    @property
    def settling(self) -> bool:
        """Whether `apply_settled` has anything to do: settled forwards to write down, or a
        segment nothing is owed from any more."""
        return bool(self._settled) or any(
            s.outstanding == 0 and s.foreign is None for s in list(self._segments.values()))

    @property
    def unreadable(self) -> dict[int, int]:
        """Segments set aside as sealed under a key this process does not hold: number →
        bytes (what to do: restore the key, or `ledger forward --give-up-unreadable`)."""
        return {n: s.foreign for n, s in list(self._segments.items()) if s.foreign is not None}

    def apply_settled(self) -> None:
        """Record what was settled in `done.log`; delete segments nothing is owed from."""
        with self._settled_lock:
            settled, self._settled = self._settled, []
        with self._lock:
            lines = []
            for (number, offset), route_id, outcome in settled:
                segment = self._segments.get(number)
                if segment is None or (offset, route_id) in segment.settled:
                    continue
                segment.settled.add((offset, route_id))
                segment.outstanding -= 1
                lines.append(f"{number} {offset} {route_id} {outcome}\n")
            # noted above before written down: a write that fails (disk full) costs a resend
            # after a restart (at least once), never a segment kept for good
            self._done_file.write("".join(lines))
            self._done_file.flush()
            deleted = False
            newest = max(self._segments, default=None)
            for number, segment in list(self._segments.items()):
                if segment.foreign is not None:  # kept: an operator settles it
                    continue
                if segment.outstanding == 0 and self._delete_if_done(
                    number, segment, idle=IDLE_SECONDS if number == newest else 0.0
                ):
                    del self._segments[number]
                    deleted = True
            if deleted:
                self._rewrite_done()

    def _delete_if_done(self, number: int, segment: _Segment, *, idle: float) -> bool:
        """Unlink a segment once everything in it was read and settled — under its lock, so
        its writer cannot append meanwhile (see the module's docstring). The newest one only
        once unwritten for `idle` seconds: deleting it makes its writer start a new file (and
        fsync the directory), which under load would be often."""
        path = _segment_path(self.directory, number)
        try:
            handle = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being written: later
            status = os.fstat(handle)
            if status.st_size != segment.read:
                return False  # more to read first
            if idle and time.time() - status.st_mtime < idle:
                return False
            path.unlink()
            return True
        finally:
            os.close(handle)

    @property
    def size(self) -> int:
        return sum(s.read for s in self._segments.values())

    def close(self) -> None:
        self.apply_settled()
        with self._lock:
            if self._done_file is not None:
                self._done_file.close()
                self._done_file = None
