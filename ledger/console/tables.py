"""The console's and the report's tables as rows for people: what, when, who — then positions
and hashes. These models are what CSV and JSON Lines downloads hold (columns in field order)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ledger.console.present import iso


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class BotRow(_Row):
    bot_id: int
    bot_code: str | None
    portal_domain: str | None
    status: str = Field(description="active or deleted")
    first_seen_at: str = Field(description="ISO 8601 UTC; Bitrix24's time when it gave one")
    last_activity_at: str
    message_count: int
    command_count: int
    chat_join_count: int
    deleted_at: str = Field(description="Bitrix24's time of the deleting event")
    deleted_by_user_id: str | None
    deleted_by_name: str | None = Field(description="as the portal's own payloads named the user")
    deletion_cause: str | None
    first_seen_position: int
    last_activity_position: int | None
    deleted_position: int | None
    portal_member_id: str


class DeletionRow(_Row):
    bot_id: int
    bot_code: str | None
    portal_domain: str | None
    deleted_at: str = Field(description="Bitrix24's time (ts of the deleting event)")
    received_at: str = Field(description="when the ledger received the deleting event")
    deleted_by_user_id: str | None
    deleted_by_name: str | None = Field(description="as the portal's own payloads named the user")
    name_from_position: int | None = Field(description="the event that gave that name")
    cause: str
    anomalies: str = Field(description="in words; empty when there is none")
    position: int = Field(description="position of the deleting event")
    event_hash: str
    portal_member_id: str


class EventRow(_Row):
    event_type: str
    bot_ids: str
    portal_domain: str | None
    occurred_at: str = Field(description="Bitrix24's time")
    received_at: str
    actor_user_id: str | None
    position: int
    event_hash: str
    portal_member_id: str


class RejectionRow(_Row):
    received_at: str
    reason: str
    status: int
    portal_member_id: str | None
    event_type: str | None
    body_size: int
    body_sha256: str
    position: int
    rejection_hash: str


class PortalRow(_Row):
    portal_domain: str | None
    trust_state: str
    installed_at: str
    uninstalled_at: str
    last_event_at: str
    silence: str | None
    event_count: int
    app_version: str | None
    last_event_position: int | None
    portal_member_id: str


def bot_row(r: dict[str, Any]) -> BotRow:
    return BotRow(
        bot_id=r["bot_id"], bot_code=r["bot_code"], portal_domain=r.get("domain"),
        status=r["status"], first_seen_at=iso(r["first_seen_at"]),
        last_activity_at=iso(r["last_activity_at"]), message_count=r["message_count"],
        command_count=r["command_count"], chat_join_count=r["chat_join_count"],
        deleted_at=iso(r["deleted_at"]), deleted_by_user_id=r["deleted_by"],
        deleted_by_name=r.get("deleted_by_name"), deletion_cause=r["deletion_cause"],
        first_seen_position=r["first_seen_position"],
        last_activity_position=r["last_activity_position"],
        deleted_position=r["deleted_position"], portal_member_id=r["member_id"],
    )


def deletion_row(r: dict[str, Any]) -> DeletionRow:
    return DeletionRow(
        bot_id=r["bot_id"], bot_code=r["bot_code"], portal_domain=r["domain"],
        deleted_at=iso(r["occurred_at"]), received_at=iso(r["received_at"]),
        deleted_by_user_id=r["actor_user_id"], deleted_by_name=r.get("actor_name"),
        name_from_position=r.get("actor_name_position"), cause=r["cause"],
        anomalies="; ".join(r.get("anomaly_words", [])), position=r["position"],
        event_hash=r["event_hash"], portal_member_id=r["member_id"],
    )


def event_row(r: dict[str, Any]) -> EventRow:
    return EventRow(
        position=r["position"], event_type=r["event_type"], portal_domain=r.get("domain"),
        occurred_at=iso(r["occurred_at"]), received_at=iso(r["received_at"]),
        bot_ids=" ".join(str(b) for b in r["bot_ids"]), actor_user_id=r["actor_user_id"],
        event_hash=r["hash"], portal_member_id=r["member_id"],
    )


def rejection_row(r: dict[str, Any]) -> RejectionRow:
    return RejectionRow(
        received_at=iso(r["received_at"]), reason=r["reason"], status=r["status"],
        portal_member_id=r["member_id"], event_type=r["event_type"], body_size=r["body_size"],
        body_sha256=r["body_sha256"], position=r["position"], rejection_hash=r["hash"],
    )


def portal_row(r: dict[str, Any]) -> PortalRow:
    return PortalRow(
        portal_domain=r["domain"], trust_state=r["trust_state"],
        installed_at=iso(r["installed_at"]), uninstalled_at=iso(r["uninstalled_at"]),
        last_event_at=iso(r["last_event_at"]), silence=r.get("silence"),
        event_count=r["event_count"], app_version=r["app_version"],
        last_event_position=r["last_event_position"], portal_member_id=r["member_id"],
    )
