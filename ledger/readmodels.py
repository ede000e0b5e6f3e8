"""What the read API and the exports answer with: typed, documented, snake_case.

These models are the OpenAPI schemas (`/api/v1/openapi.json` is generated from them), and the
tests validate every response against them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class _Model(BaseModel):
    """Public names are the audit views' column names (docs/auditors.md, "Vocabulary"); where
    the projections call a field otherwise, the field keeps that Python name and carries the
    public one as its alias. Dump with `by_alias=True` for anything a person or program reads."""

    model_config = ConfigDict(frozen=True, from_attributes=True, populate_by_name=True)


class PortalOut(_Model):
    member_id: str = Field(alias="portal_member_id")
    domain: str | None = Field(alias="portal_domain")
    trust_state: str = Field(description="allowed, trusted, ended or unknown")
    installed_at: datetime | None
    uninstalled_at: datetime | None
    install_count: int
    app_version: str | None
    event_count: int
    last_event_at: datetime | None = Field(description="silence on a portal shows here")
    last_event_position: int | None


class BotOut(_Model):
    """A bot in the registry; field names are audit.bots' column names."""

    bot_id: int
    bot_code: str | None
    member_id: str = Field(alias="portal_member_id")
    api_version: str = Field(description="v1 (ONIMBOT*) or v2 (ONIMBOTV2*)")
    status: str = Field(description="active or deleted")
    first_seen_at: datetime
    last_activity_at: datetime | None
    message_count: int
    command_count: int
    chat_join_count: int
    deleted_at: datetime | None = Field(
        description="Bitrix24 time of the deleting event (its ts), else its received time")
    deleted_by: str | None = Field(alias="deleted_by_user_id",
                                   description="auth.user_id of the deleting event")
    deletion_cause: str | None
    first_seen_position: int
    last_activity_position: int | None
    deleted_position: int | None


class DeletionOut(_Model):
    """A deletion, in human order (what, when, who, then positions and hashes); field names
    are audit.deletions' column names."""

    bot_id: int
    bot_code: str | None
    domain: str | None = Field(alias="portal_domain")
    cause: str
    event_type: str
    occurred_at: datetime | None = Field(
        alias="deleted_at",
        description="Bitrix24 time of the deleting event (its ts); null when it gave none")
    received_at: datetime = Field(description="when the ledger received the deleting event")
    actor_user_id: str | None = Field(alias="deleted_by_user_id",
                                      description="auth.user_id of the deleting event")
    first_seen_at: datetime | None
    last_activity_at: datetime | None
    message_count: int
    anomalies: list[str] = Field(
        description="never_seen, repeated, activity_after_deletion, unexpected_payload"
    )
    payload_anomalies: list[str] = Field(
        default_factory=list,
        description="what the deleting event's payload held that the registry could not use",
    )
    position: int = Field(description="position of the deleting event")
    event_hash: str = Field(description="its chain hash, hex")
    member_id: str = Field(alias="portal_member_id")


class RejectionOut(_Model):
    """A refused delivery as auditors see it: never the excerpt, only its size and hash."""

    position: int = Field(description="position in the rejection log's own chain")
    received_at: datetime
    status: int = Field(description="the HTTP status the sender got")
    reason: str = Field(description="stable reason code, e.g. invalid_application_token")
    detail: str
    member_id: str | None = Field(alias="portal_member_id",
                                  description="the portal the delivery claimed, if readable")
    domain: str | None = Field(alias="portal_domain")
    event_type: str | None
    peer: str | None
    content_type: str | None
    body_size: int
    body_sha256: str
    excerpt_chars: int
    excerpt_sha256: str
    hash: str = Field(alias="rejection_hash",
                      description="chain hash of the rejection log entry, hex")


class EventOut(_Model):
    """A stored event; field names are audit.events' column names."""

    position: int
    event_type: str
    member_id: str = Field(alias="portal_member_id")
    bot_ids: list[int]
    occurred_at: datetime | None = Field(description="Bitrix24 time (the event's ts)")
    received_at: datetime = Field(description="when the ledger received it")
    actor_user_id: str | None = Field(description="auth.user_id of the event")
    origin: str
    hash: str = Field(alias="event_hash", description="chain hash, hex")
    payload: dict[str, Any] | None = Field(
        default=None, description="the stored payload (secrets removed), when asked for"
    )
    anomalies: list[str] | None = Field(
        default=None,
        description="in a bot's history: what this event's payload held that the registry "
        "could not use (non-ASCII or out-of-range ids, wrong types)",
    )


class Page(_Model, Generic[T]):
    items: list[T]
    next_after: int | None = Field(
        description="pass as `after` for the next page; null at the end"
    )


class BotHistory(_Model):
    bot: BotOut
    events: list[EventOut]
    next_after: int | None


class VerificationOut(_Model):
    stream: str
    ran_at: datetime | None
    ok: bool | None
    verified_rows: int | None
    problem: str | None
    checkpoint_position: int | None
    head_position: int = Field(description="the chain's head now")
    head_hash: str


class ProjectionOut(_Model):
    projection: str
    position: int = Field(description="the store position the projection is folded up to")
    head_hash: str = Field(description="the chain hash at that position, hex")
    updated_at: datetime


class StoredEventOut(_Model):
    """An event exactly as stored: what its chain entry hash is computed from."""

    position: int
    member_id: str
    event_type: str
    origin: str
    bot_ids: list[int]
    occurred_at: str | None = Field(description="RFC 3339 UTC, six fractional digits")
    received_at: str = Field(description="RFC 3339 UTC, six fractional digits")
    dedup_key: str = Field(description="hex")
    body_sha256: str | None = Field(description="hex")
    payload: str = Field(description="the stored payload JSON text, byte for byte")
    payload_sha256: str = Field(description="hex")
    metadata: str = Field(description="the stored canonical metadata JSON text")
    prev_hash: str = Field(description="hex")
    hash: str = Field(description="hex: the chain entry hash, which is the Merkle leaf")


class ProofOut(_Model):
    """A self-contained inclusion proof (docs/spec/proofs.md)."""

    format: str = Field(description="ledger-inclusion-proof/v1")
    log_id: str
    event: StoredEventOut
    leaf: str = Field(description="hex: the event's chain entry hash")
    leaf_index: int = Field(description="position - 1")
    tree_size: int
    audit_path: list[str] = Field(description="hex hashes, RFC 6962 PATH order")
    checkpoint: str = Field(description="the signed note (C2SP tlog-checkpoint)")


class ErrorOut(_Model):
    error: str
    message: str
