"""The local outbox: bodies waiting to be forwarded, encrypted at rest, deleted once settled.

A forwarded body still holds the portal's `application_token` and OAuth tokens (the app needs
them), so it never goes to PostgreSQL or a log: only here, encrypted with AES-GCM (a random
96-bit nonce per record, the frame header as associated data), and in memory.

Layout (one directory per worker process):
- `seg-<n>.log`: frames `"LOB1"` ‖ uint32 length ‖ nonce ‖ AES-GCM(JSON header ‖ "\\n" ‖ body),
  written (to the kernel) before the delivery is answered, so a killed process loses none; they
  are fsync'd in the background every `sync_interval` (waiting for an fsync per batch would halve
  intake throughput: bench/RESULTS.md), so an OS crash or power loss may lose the forwards of
  that last interval. A frame is known by (segment, offset).
- `done.log`: one plaintext line `<segment> <offset> <route> <outcome>` per forward settled
  (delivered or given up); not fsync'd — losing a line only means that forward is sent again
  (at least once). A segment file is deleted once every forward in it is settled; `done.log`
  is rewritten at start-up to what still matters.

Key: `LEDGER_OUTBOX_KEY` (base64 of 32 bytes) or `LEDGER_DATA_DIR/keys/outbox.key`, created
0600 on first use. Without the key, the files are noise; with another key, start-up refuses.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ledger.errors import OutboxError

log = logging.getLogger(__name__)

MAGIC = b"LOB1"
_FRAME = struct.Struct(">4sI")
_NONCE = 12
KEY_NAME = "outbox.key"

Location = tuple[int, int]  # (segment, offset)


def load_key(path: Path, configured: str | None) -> bytes:
    """The outbox key from the setting, else from `path` (created, 0600, when missing)."""
    if configured:
        try:
            key = base64.b64decode(configured, validate=True)
        except ValueError as exc:
            raise OutboxError("LEDGER_OUTBOX_KEY is not base64") from exc
        if len(key) != 32:
            raise OutboxError("LEDGER_OUTBOX_KEY must be 32 bytes, base64-encoded")
        return key
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        # written aside, then linked into place: workers starting together all get one key
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(base64.b64encode(AESGCM.generate_key(bit_length=256)) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process was first: use its key
        finally:
            temporary.unlink()
    try:
        key = base64.b64decode(path.read_bytes().strip(), validate=True)
    except ValueError as exc:
        raise OutboxError(f"{path} does not hold a base64 key") from exc
    if len(key) != 32:
        raise OutboxError(f"{path} does not hold a 32-byte key (base64)")
    return key


@dataclass(slots=True)
class Recovered:
    """A record found in the outbox at start-up, with the routes it still owes."""

    location: Location
    header: dict[str, Any]
    routes: list[str]


@dataclass(slots=True)
class _Segment:
    outstanding: int = 0
    size: int = 0
    settled: set[tuple[int, str]] = field(default_factory=set)


class Outbox:
    """Blocking file I/O (call it from a thread); safe to use from several threads."""

    def __init__(self, directory: Path, key: bytes, *, segment_bytes: int = 8 * 1024**2) -> None:
        self.directory = directory
        self._aead = AESGCM(key)
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._active: int | None = None
        self._active_file: Any = None
        self._next = 0
        self._done_file: Any = None
        self._settled: list[tuple[Location, str, str]] = []
        self._settled_lock = threading.Lock()  # never held during I/O
        self._unsynced = False

    # ---- start-up ---------------------------------------------------------------------------

    def recover(self) -> list[Recovered]:
        """Open the outbox; what is still owed, oldest first. Torn tails are cut off."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        settled = self._read_done()
        found: list[Recovered] = []
        numbers = sorted(int(p.stem[4:]) for p in self.directory.glob("seg-*.log"))
        for number in numbers:
            path = self._path(number)
            segment = _Segment()
            for offset, header in self._frames(path):
                owed = [r for r in header["routes"] if (offset, r) not in settled.get(number, ())]
                segment.outstanding += len(owed)
                if owed:
                    found.append(Recovered((number, offset), header, owed))
            if segment.outstanding == 0:
                path.unlink()
                continue
            segment.size = path.stat().st_size
            segment.settled = settled.get(number, set())
            self._segments[number] = segment
        self._next = (numbers[-1] + 1) if numbers else 0
        self._rewrite_done()
        return found

    def _read_done(self) -> dict[int, set[tuple[int, str]]]:
        settled: dict[int, set[tuple[int, str]]] = {}
        path = self.directory / "done.log"
        if not path.exists():
            return settled
        for line in path.read_text("ascii", "replace").splitlines():
            parts = line.split(" ")
            if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit():
                settled.setdefault(int(parts[0]), set()).add((int(parts[1]), parts[2]))
        return settled

    def _rewrite_done(self) -> None:
        path = self.directory / "done.log"
        temporary = path.with_suffix(".tmp")
        with open(temporary, "w", encoding="ascii") as handle:
            for number, segment in sorted(self._segments.items()):
                for offset, route in sorted(segment.settled):
                    handle.write(f"{number} {offset} {route} settled\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
        self._done_file = open(path, "a", encoding="ascii")  # noqa: SIM115 - kept open

    def _frames(self, path: Path) -> list[tuple[int, dict[str, Any]]]:
        data = path.read_bytes()
        frames: list[tuple[int, dict[str, Any]]] = []
        offset = 0
        while offset < len(data):
            header = data[offset : offset + _FRAME.size]
            if len(header) < _FRAME.size:
                break
            magic, length = _FRAME.unpack(header)
            end = offset + _FRAME.size + length
            if magic != MAGIC or end > len(data):
                break
            plain = self._open(data[offset:end])
            frames.append((offset, orjson.loads(plain.split(b"\n", 1)[0])))
            offset = end
        if offset < len(data):
            # never fsync'd to the end, so never acknowledged: the delivery got no 2xx
            log.warning("outbox %s: cutting a torn tail of %d bytes", path, len(data) - offset)
            with open(path, "r+b") as handle:
                handle.truncate(offset)
                os.fsync(handle.fileno())
        return frames

    # ---- records ----------------------------------------------------------------------------

    def _seal(self, header: dict[str, Any], body: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, orjson.dumps(header) + b"\n" + body, MAGIC)
        return _FRAME.pack(MAGIC, _NONCE + len(sealed)) + nonce + sealed

    def _open(self, frame: bytes) -> bytes:
        nonce = frame[_FRAME.size : _FRAME.size + _NONCE]
        try:
            return self._aead.decrypt(nonce, frame[_FRAME.size + _NONCE :], MAGIC)
        except InvalidTag as exc:
            raise OutboxError(
                f"an outbox record in {self.directory} does not decrypt: the outbox key is not "
                "the one it was written with (restore LEDGER_OUTBOX_KEY or keys/outbox.key)"
            ) from exc

    def append(self, records: list[tuple[dict[str, Any], bytes]]) -> list[Location]:
        """Write records (header, body) to the kernel (not fsync'd: see `sync`); where each is."""
        with self._lock:
            if self._active is None or self._segments[self._active].size > self._segment_bytes:
                self._rotate()
            assert self._active is not None
            segment = self._segments[self._active]
            locations: list[Location] = []
            frames: list[bytes] = []
            offset = segment.size
            for header, body in records:
                frame = self._seal(header, body)
                locations.append((self._active, offset))
                frames.append(frame)
                offset += len(frame)
                segment.outstanding += len(header["routes"])
            self._active_file.write(b"".join(frames))
            self._active_file.flush()
            self._unsynced = True
            segment.size = offset
            return locations

    def sync(self) -> None:
        """fsync what was written since the last call."""
        with self._lock:
            if self._unsynced and self._active_file is not None:
                os.fsync(self._active_file.fileno())
            self._unsynced = False

    @property
    def unsynced(self) -> bool:
        return self._unsynced

    def _rotate(self) -> None:
        if self._active_file is not None:
            if self._unsynced:
                os.fsync(self._active_file.fileno())
            self._active_file.close()
        number = self._next
        self._next += 1
        self._active = number
        self._segments[number] = _Segment()
        self._active_file = open(self._path(number), "ab")  # noqa: SIM115 - kept open
        with contextlib.suppress(OSError):  # make the new file's name durable too
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def read(self, location: Location) -> tuple[dict[str, Any], bytes]:
        """A record's header and body (for a forward whose body was not kept in memory)."""
        number, offset = location
        with open(self._path(number), "rb") as handle:
            handle.seek(offset)
            magic, length = _FRAME.unpack(handle.read(_FRAME.size))
            frame = _FRAME.pack(magic, length) + handle.read(length)
        header, _, body = self._open(frame).partition(b"\n")
        return orjson.loads(header), body

    def settle(self, location: Location, route_id: str, outcome: str) -> None:
        """One forward is over (delivered or given up). Only noted here — no I/O, so the event
        loop may call it; `apply_settled` (from a thread) writes it down."""
        with self._settled_lock:
            self._settled.append((location, route_id, outcome))

    @property
    def settling(self) -> bool:
        return bool(self._settled)

    def apply_settled(self) -> None:
        """Record what was settled in `done.log`; delete segments nothing is owed from."""
        with self._settled_lock:
            settled, self._settled = self._settled, []
        if not settled:
            return
        with self._lock:
            for (number, offset), route_id, outcome in settled:
                segment = self._segments.get(number)
                if segment is None or (offset, route_id) in segment.settled:
                    continue
                segment.settled.add((offset, route_id))
                segment.outstanding -= 1
                self._done_file.write(f"{number} {offset} {route_id} {outcome}\n")
                if segment.outstanding > 0:
                    continue
                if number == self._active:
                    self._active_file.close()
                    self._active_file, self._active = None, None
                    self._unsynced = False  # nothing in it is owed any more
                del self._segments[number]
                self._path(number).unlink(missing_ok=True)
            self._done_file.flush()
            if not self._segments:
                self._done_file.truncate(0)

    @property
    def size(self) -> int:
        return sum(s.size for s in self._segments.values())

    def close(self) -> None:
        self.apply_settled()
        self.sync()
        with self._lock:
            if self._active_file is not None:
                self._active_file.close()
            if self._done_file is not None:
                self._done_file.close()

    def _path(self, number: int) -> Path:
        return self.directory / f"seg-{number:08d}.log"
