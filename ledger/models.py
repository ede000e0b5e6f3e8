"""Values that cross layer boundaries: what intake hands the store and what it gets back.

The hot-path items are frozen dataclasses (cheap to build per delivery); read-side rows become
pydantic models at the store boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ledger.trust import TRUST_EVENT as TRUST_EVENT  # re-exported: where readers find it
from ledger.trust import TrustChange

ORIGIN_BITRIX24 = "bitrix24"
ORIGIN_OPERATOR = "operator"
ORIGIN_LEDGER = "ledger"


@dataclass(slots=True)
class EventDraft:
    """An event ready to append, minus what only the serialisation point assigns (position, hash).

    For Bitrix24 deliveries, `presented_sha256` is judged against the portal's trust inside the
    append; operator events carry `trust_change` and its token digest instead.

    Not frozen, but never changed once built (`dataclasses.replace` makes a changed copy): one
    is built per delivery, and a frozen 19-field dataclass costs ~2 µs more to build.
    """

    event_type: str
    member_id: str
    domain: str | None
    origin: str
    bot_ids: tuple[int, ...]
    occurred_at: datetime | None
    received_at: datetime
    payload: bytes  # JSON text, exactly as stored and hashed
    payload_sha256: bytes
    dedup_key: bytes
    body_sha256: bytes | None
    metadata: dict[str, Any]
    presented_sha256: bytes | None = None
    user_id: str | None = None
    # operator trust actions (origin == operator)
    trust_change: TrustChange | None = None
    new_token_sha256: bytes | None = None
    allow_domain: str | None = None
    body_size: int = 0
    # excerpt size for the rejection log if trust refuses it (None: the rate limit says don't)
    refusal_excerpt_bytes: int | None = None
    # an install admitted by a domain allowance: the portal at this domain confirmed it (REST)
    confirmed_domain: str | None = None
    confirmation_refused: str | None = None  # or why it could not be confirmed
    # spooled while PostgreSQL was away: the offline trust journal's length then (ledger.offline)
    offline_seen: int | None = None
    # spooled after the offline judge accepted it on settled (not provisional) trust, changing
    # no trust itself: it was verified as firmly as online and the sender heard 202, so the drain
    # stores it whatever another worker's spooled lifecycle event did to trust meanwhile
    offline_accepted: bool = False
    # what the fold reads of the payload (`ledger.foldrecord`), computed where the payload was
    # built; None (older spool records): the planner reads it from the payload
    fold_record: str | None = None


@dataclass(frozen=True, slots=True)
class RejectionDraft:
    """One knock on the door that was not let in, for the append-only rejection log."""

    received_at: datetime
    status: int
    reason: str
    detail: str
    member_id: str | None
    event_type: str | None
    peer: str | None
    content_type: str | None
    body_size: int
    body_sha256: bytes
    excerpt: str


@dataclass(frozen=True, slots=True)
class Stored:
    position: int
    hash: bytes
    trust_change: TrustChange | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    position: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """Refused inside the append (trust); already written to the rejection log."""

    status: int
    code: str
    message: str
    rejection_position: int


@dataclass(frozen=True, slots=True)
class RejectionLogged:
    position: int


@dataclass(frozen=True, slots=True)
class Spooled:
    """Durable in the local spool (PostgreSQL unreachable); stored when it is back."""


@dataclass(frozen=True, slots=True)
class ConfirmationNeeded:
    """Nothing written: an install a domain allowance admits once the portal confirms it."""

    domain: str


Outcome = Stored | Duplicate | Refusal | RejectionLogged | Spooled | ConfirmationNeeded


@dataclass(frozen=True, slots=True)
class Transaction:
    """A PostgreSQL transaction, as a lifecycle append records it before its COMMIT (its
    outcome may be in doubt: `ledger.offline`): its 64-bit id (`pg_current_xact_id`), which
    `pg_xact_status` answers committed/aborted/in progress for, and its backend (pid and start
    time: a pid alone may be another backend's by now) — to end it if it stalls."""

    xid: int
    pid: int
    backend_start: str  # as PostgreSQL prints it (text round-trips a timestamptz exactly)

    def as_json(self) -> list[Any]:
        return [str(self.xid), self.pid, self.backend_start]

    @classmethod
    def of_json(cls, value: Any) -> Transaction | None:
        """From `as_json`'s form; None for anything else (a torn or foreign journal line)."""
        try:
            xid, pid, started = value
            return cls(int(xid), int(pid), str(started))
        except (TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class FoundStored:
    """A delivery in doubt found stored (`EventStore.settle_transaction`): its position, the
    trust event it caused (position and payload; none if it caused none) and the token digest
    it was accepted under."""

    member_id: str
    dedup_key: bytes
    position: int
    trust_position: int | None
    trust_payload: dict[str, Any] | None
    accepted_under: bytes | None
Draft = EventDraft | RejectionDraft


@dataclass(frozen=True, slots=True)
class PortalRow:
    member_id: str
    domain: str | None
    state: str
    changed_at: datetime
    changed_position: int
    token_fingerprint: str | None = None
    allowed: bool = field(default=False)
