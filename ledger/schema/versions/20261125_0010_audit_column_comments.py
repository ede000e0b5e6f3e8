"""A comment on every column of the audit views: what it means, in one vocabulary.

"Bitrix24 time" is the `ts` Bitrix24 put in the event (when it happened by Bitrix24's clock);
"received" is when the ledger stored it. Columns named `*_at` of people-facing facts use Bitrix24
time where the event gave one, and the received time otherwise; `received_at` is always ours.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_AT = "Bitrix24 time of that event (its ts), or its received time when Bitrix24 gave none"
_PORTAL = "the portal's Bitrix24 member_id (stable; the domain can change)"
_DOMAIN = "the portal's domain as its latest event gave it, e.g. some-domain.bitrix24.com"

COMMENTS: dict[str, dict[str, str]] = {
    "events": {
        "position": "place in the ledger: gap-free, in commit order; the chain's index",
        "received_at": "when the ledger received and stored the event (ledger clock, UTC)",
        "occurred_at": "Bitrix24 time: the event's ts (when Bitrix24 says it happened); "
                       "null when it gave none",
        "portal_member_id": _PORTAL,
        "portal_domain": _DOMAIN,
        "event_type": "Bitrix24 event name (ONIMBOTDELETE, …) or LEDGER.* for the ledger's own",
        "origin": "bitrix24 (a delivery), operator (a person's action) or ledger (the service)",
        "bot_ids": "every bot id the event names (indexable: bot_ids @> '{567}')",
        "actor_user_id": "auth.user_id: the Bitrix24 user on whose behalf the event was sent",
        "payload": "the delivery as decoded, secrets removed (their fingerprints are kept in "
                   "the event's metadata)",
        "query": "the delivery's URL query string, decoded, secrets removed",
        "event_hash": "chain hash (hex): SHA-256 over the previous hash, position, canonical "
                      "metadata and payload_sha256",
        "payload_sha256": "SHA-256 (hex) of the stored payload's canonical JSON",
    },
    "bots": {
        "portal_member_id": _PORTAL,
        "portal_domain": _DOMAIN,
        "bot_id": "the bot's id on its portal",
        "bot_code": "the bot's CODE as the latest event that gave one said",
        "api_version": "v1 (ONIMBOT* events) or v2 (ONIMBOTV2* events)",
        "status": "active, or deleted (by ONIMBOTDELETE or by uninstalling the application)",
        "first_seen_at": "first event naming the bot: " + _AT,
        "first_seen_position": "position of the first event naming the bot",
        "last_activity_at": "latest event naming the bot: " + _AT,
        "last_activity_position": "position of the latest event naming the bot",
        "message_count": "messages the bot received (ONIMBOTMESSAGEADD, ONIMBOTV2MESSAGEADD)",
        "command_count": "commands the bot received (ONIMCOMMANDADD, ONIMBOTV2COMMANDADD)",
        "chat_join_count": "chats the bot joined (ONIMBOTJOINCHAT, ONIMBOTV2JOINCHAT)",
        "deleted_at": "the deleting event: " + _AT,
        "deleted_by_user_id": "auth.user_id of the deleting event (who deleted the bot)",
        "deletion_cause": "bot deleted, or application uninstalled",
        "deleted_position": "position of the deleting event",
    },
    "deletions": {
        "deleted_at": "Bitrix24 time of the deleting event (its ts); null when it gave none",
        "received_at": "when the ledger received the deleting event",
        "portal_member_id": _PORTAL,
        "portal_domain": _DOMAIN,
        "bot_id": "the deleted bot's id",
        "bot_code": "the deleted bot's CODE",
        "deleted_by_user_id": "auth.user_id of the deleting event (who deleted the bot)",
        "cause": "bot deleted (ONIMBOTDELETE) or application uninstalled (ONAPPUNINSTALL)",
        "event_type": "type of the deleting event",
        "position": "position of the deleting event",
        "event_hash": "chain hash (hex) of the deleting event",
        "first_seen_at": "first event naming the bot: " + _AT + "; null when never seen",
        "last_activity_at": "latest event naming the bot before its deletion: " + _AT,
        "message_count": "messages the bot had received when it was deleted",
        "anomaly_never_seen": "true: the ledger had never seen this bot before it was deleted",
        "anomaly_repeated": "true: the bot had already been deleted before",
        "anomaly_activity_after_deletion": "true: the bot was active again after this deletion",
        "activity_after_position": "position of the first activity after this deletion",
        "payload_anomalies": "what the deleting event's payload held that the ledger could not "
                             "read as expected (path: problem); empty when nothing",
    },
    "rejections": {
        "position": "place in the rejection log (its own gap-free chain, apart from events)",
        "received_at": "when the ledger received and refused the delivery",
        "status": "the HTTP status the sender was answered with",
        "reason": "why it was refused: a stable code such as invalid_application_token",
        "detail": "the refusal in words (the ledger's own text, never the sender's)",
        "portal_member_id": "the member_id the delivery claimed, when it named one",
        "portal_domain": _DOMAIN,
        "event_type": "the event type the delivery claimed, when it named one",
        "peer": "the address the delivery came from",
        "content_type": "the Content-Type the delivery was sent with",
        "body_size": "bytes in the refused body",
        "body_sha256": "SHA-256 (hex) of the refused body as received",
        "excerpt_chars": "length of the kept, redacted excerpt (the excerpt itself is not shown)",
        "excerpt_sha256": "SHA-256 (hex) of the kept excerpt",
        "rejection_hash": "chain hash (hex) of this rejection in the rejection log",
    },
    "anomalies": {
        "position": "position of the stored event whose payload held something unexpected",
        "portal_member_id": _PORTAL,
        "event_type": "type of that event",
        "bot_ids": "the bot ids the event names",
        "notes": "what was unexpected, one note per place (path: problem)",
    },
    "portals": {
        "portal_member_id": _PORTAL,
        "portal_domain": _DOMAIN,
        "trust_state": "allowed, trusted (installed, token known), ended (uninstalled or "
                       "revoked) or unknown",
        "installed_at": "latest ONAPPINSTALL: " + _AT,
        "uninstalled_at": "latest ONAPPUNINSTALL after it: " + _AT,
        "install_count": "how many times the application was installed",
        "app_version": "application version from the latest install or update",
        "event_count": "events stored for this portal",
        "last_event_at": "when the ledger received the portal's latest event (silence shows "
                         "here)",
        "last_event_position": "position of the portal's latest event",
    },
    "portal_lifecycle": {
        "position": "position of the install, update or uninstall event",
        "portal_member_id": _PORTAL,
        "portal_domain": _DOMAIN,
        "event_type": "ONAPPINSTALL, ONAPPUPDATE or ONAPPUNINSTALL",
        "occurred_at": "Bitrix24 time: the event's ts; null when it gave none",
        "received_at": "when the ledger received the event",
        "app_version": "application version the event gave",
        "actor_user_id": "auth.user_id of the event, when given",
    },
}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def upgrade() -> None:
    execute_script("\n".join(
        f"COMMENT ON COLUMN audit.{view}.{column} IS {_quote(comment)};"
        for view, columns in COMMENTS.items() for column, comment in columns.items()
    ))


def downgrade() -> None:
    execute_script("\n".join(
        f"COMMENT ON COLUMN audit.{view}.{column} IS NULL;"
        for view, columns in COMMENTS.items() for column in columns
    ))
