"""Store-and-forward: when PostgreSQL is unreachable, verified drafts wait in a local file.

Bitrix24 never re-sends, so a 503 during a database restart would lose the event for good. The
spool is one append-only file of records, each fsync'd before the sender hears 2xx:

    record  = magic "LSP1" (4 bytes) ‖ length (uint32 BE) ‖ CRC-32 of body (uint32 BE) ‖ body
    body    = UTF-8 JSON of one draft: {"kind": "event"|"rejection", <fields>}, bytes as hex,
              times as ISO 8601

A second file, `drained`, holds (fsync'd) the offset up to which records are in PostgreSQL. Drained
records are appended again idempotently if a crash comes between COMMIT and that write (the dedup
key makes the second copy a duplicate). A record cut short or failing its CRC (power loss while
writing) is moved aside to `spool.corrupt-<time>` and reported — never stored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from ledger.errors import SpoolFull
from ledger.models import Draft, EventDraft, RejectionDraft
from ledger.trust import TrustChange

log = logging.getLogger(__name__)

MAGIC = b"LSP1"
_HEADER = struct.Struct(">4sII")
_BYTES = {"payload", "payload_sha256", "dedup_key", "body_sha256", "presented_sha256",
          "new_token_sha256"}
_TIMES = {"occurred_at", "received_at"}


def encode(draft: Draft) -> bytes:
    kind = "event" if isinstance(draft, EventDraft) else "rejection"
    fields: dict[str, Any] = {"kind": kind}
    for f in dataclasses.fields(draft):
        value = getattr(draft, f.name)
        if isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, TrustChange):
            value = value.value
        fields[f.name] = value
    return orjson.dumps(fields)


def decode(body: bytes) -> Draft:
    fields: dict[str, Any] = orjson.loads(body)
    kind = fields.pop("kind")
    for name in list(fields):
        value = fields[name]
        if value is None:
            continue
        if name in _BYTES:
            fields[name] = bytes.fromhex(value)
        elif name in _TIMES:
            fields[name] = datetime.fromisoformat(value)
    if kind == "event":
        fields["bot_ids"] = tuple(fields["bot_ids"])
        if fields.get("trust_change") is not None:
            fields["trust_change"] = TrustChange(fields["trust_change"])
        return EventDraft(**fields)
    return RejectionDraft(**fields)


@dataclass(frozen=True)
class Pending:
    drafts: list[Draft]
    end: int  # offset just past the last of them


class Spool:
    """One process's spool directory. Not thread-safe: one committer task owns it."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.max_bytes = max_bytes
        self._log = directory / "spool.log"
        self._marker = directory / "drained"
        self._log.touch(exist_ok=True)
        self.drained = self._read_marker()
        self.corrupt_found: list[Path] = []
        self.records = 0
        self.oldest: datetime | None = None
        self._size = self._recover()

    @property
    def size(self) -> int:
        return self._size

    def has_pending(self) -> bool:
        return self._size > self.drained

    def age_seconds(self) -> float:
        if self.oldest is None or not self.has_pending():
            return 0.0
        return (datetime.now(UTC) - self.oldest).total_seconds()

    def append(self, drafts: list[Draft]) -> None:
        """Write and fsync; raise SpoolFull (writing nothing) past the limit."""
        blob = b"".join(self._record(encode(d)) for d in drafts)
        if self._size + len(blob) > self.max_bytes:
            raise SpoolFull(
                f"the spool in {self.directory} holds {self._size} bytes, its limit is "
                f"{self.max_bytes}: PostgreSQL must come back (or LEDGER_SPOOL_MAX_BYTES grow)"
            )
        descriptor = os.open(self._log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "ab") as handle:
            os.fchmod(handle.fileno(), 0o600)  # payloads: the owner's only (older files too)
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        if not self.has_pending():
            self.oldest = drafts[0].received_at if drafts else None
        self._size += len(blob)
        self.records += len(drafts)

    def read(self, limit: int) -> Pending:
        """Up to `limit` undrained drafts, in order."""
        drafts: list[Draft] = []
        with self._log.open("rb") as handle:
            handle.seek(self.drained)
            offset = self.drained
            while len(drafts) < limit and offset < self._size:
                header = handle.read(_HEADER.size)
                _, length, _ = _HEADER.unpack(header)
                drafts.append(decode(handle.read(length)))
                offset += _HEADER.size + length
        return Pending(drafts, offset)

    def mark_drained(self, pending: Pending) -> None:
        """Record (durably) that these drafts are in PostgreSQL; empty the files when all are."""
        self.records -= len(pending.drafts)
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

    def quarantine(self, pending: Pending, reason: str) -> Path:
        """Set aside drafts PostgreSQL will not take, so the ones after them can drain."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        aside = self.directory / f"spool.refused-{stamp}"
        aside.write_bytes(b"".join(self._record(encode(d)) for d in pending.drafts))
        log.error("spooled deliveries refused by PostgreSQL (%s): kept in %s", reason, aside)
        self.mark_drained(pending)
        return aside

    # ---- file handling --------------------------------------------------------------------

    @staticmethod
    def _record(body: bytes) -> bytes:
        return _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body

    def _read_marker(self) -> int:
        try:
            return int(self._marker.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _write_marker(self, offset: int) -> None:
        temporary = self._marker.with_suffix(".tmp")
        with temporary.open("w") as handle:
            handle.write(str(offset))
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self._marker)

    def _recover(self) -> int:
        """Check every undrained record; move a corrupt or torn tail aside and report it."""
        data = self._log.read_bytes()
        if self.drained > len(data):  # cannot be drained past the end: trust the records
            log.warning("spool %s: drained offset %d beyond its end %d; draining it all again",
                        self._log, self.drained, len(data))
            self.drained = 0
        offset = self.drained
        while offset < len(data):
            header = data[offset : offset + _HEADER.size]
            if len(header) < _HEADER.size:
                break
            magic, length, crc = _HEADER.unpack(header)
            body = data[offset + _HEADER.size : offset + _HEADER.size + length]
            if magic != MAGIC or len(body) < length or zlib.crc32(body) != crc:
                break
            if self.oldest is None:
                self.oldest = decode(body).received_at
            self.records += 1
            offset += _HEADER.size + length
        if offset < len(data):
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            aside = self.directory / f"spool.corrupt-{stamp}"
            aside.write_bytes(data[offset:])
            with self._log.open("r+b") as handle:
                handle.truncate(offset)
                os.fsync(handle.fileno())
            self.corrupt_found.append(aside)
            log.error(
                "spool %s: %d bytes at offset %d are torn or corrupt (a crash while writing?); "
                "moved to %s and NOT stored — inspect it",
                self._log, len(data) - offset, offset, aside,
            )
        return offset
