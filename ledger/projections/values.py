"""What the fold builds and snapshots keep: bots, deletions, portals, lifecycle, anomalies.

A module of their own, apart from `fold`, because the codec (`ledger.codec`) reads their type
annotations to snapshot and restore them, and mypyc erases those in a compiled module: `fold`
is compiled in the optional compiled build (pyproject.toml `[tool.ledger.mypyc]`), these stay
Python. `fold` re-exports them, so they are imported from there as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(slots=True)
class Bot:
    member_id: str
    bot_id: int
    bot_code: str | None
    api_version: str
    status: str
    first_seen_position: int
    first_seen_at: datetime
    last_activity_position: int | None = None
    last_activity_at: datetime | None = None
    message_count: int = 0
    command_count: int = 0
    chat_join_count: int = 0
    deleted_position: int | None = None
    deleted_at: datetime | None = None
    deleted_by: str | None = None
    deletion_cause: str | None = None
    code_position: int | None = None  # the event that set bot_code
    last_deletion_position: int | None = None  # the latest deletion row of this bot

    @property
    def key(self) -> tuple[str, int]:
        return self.member_id, self.bot_id


@dataclass(slots=True)
class Deletion:
    position: int
    bot_id: int
    member_id: str
    domain: str | None
    bot_code: str | None
    occurred_at: datetime | None
    received_at: datetime
    actor_user_id: str | None
    cause: str
    event_type: str
    event_hash: bytes
    first_seen_at: datetime | None
    last_activity_at: datetime | None
    message_count: int
    never_seen: bool
    repeated: bool
    activity_after_deletion: bool = False
    activity_after_position: int | None = None
    payload_anomalies: list[str] = field(default_factory=list)  # of the deleting event

    @property
    def key(self) -> tuple[int, int]:
        return self.position, self.bot_id


@dataclass(slots=True)
class Portal:
    member_id: str
    domain: str | None
    trust_state: str = "unknown"
    trust_position: int | None = None
    installed_at: datetime | None = None
    installed_position: int | None = None
    uninstalled_at: datetime | None = None
    uninstalled_position: int | None = None
    install_count: int = 0
    app_version: str | None = None
    event_count: int = 0
    first_event_position: int | None = None
    last_event_at: datetime | None = None
    last_event_position: int | None = None


@dataclass(frozen=True, slots=True)
class Lifecycle:
    """One install, update or uninstall of the application on a portal."""

    position: int
    member_id: str
    event_type: str
    occurred_at: datetime | None
    received_at: datetime
    version: str | None
    actor_user_id: str | None


@dataclass(slots=True)
class Anomaly:
    """What the fold found unexpected in one stored event's payload, and set aside."""

    position: int
    member_id: str
    event_type: str
    bot_ids: list[int]
    notes: list[str]
