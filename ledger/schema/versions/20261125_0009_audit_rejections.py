"""Refused deliveries for auditors: `audit.rejections`, without the excerpt.

The excerpt is redacted, but it is still sender-controlled text that may carry what redaction did
not recognise; readers get the facts (reason, time, portal, hashes, sizes) and the chain hash that
ties each row to `ledger verify`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    CREATE VIEW audit.rejections AS
    SELECT r.position,
           r.received_at,
           r.status,
           r.reason,
           r.detail,
           r.member_id                        AS portal_member_id,
           p.domain                           AS portal_domain,
           r.event_type,
           r.peer,
           r.content_type,
           r.body_size,
           encode(r.body_sha256, 'hex')       AS body_sha256,
           length(r.excerpt)                  AS excerpt_chars,
           encode(sha256(convert_to(r.excerpt, 'UTF8')), 'hex') AS excerpt_sha256,
           encode(r.hash, 'hex')              AS rejection_hash
    FROM ledger.rejections r
    LEFT JOIN projections.portals p ON p.member_id = r.member_id;
    COMMENT ON VIEW audit.rejections IS
        'Every refused delivery: why, when, which portal, sizes and hashes (never the excerpt).';
    ALTER VIEW audit.rejections OWNER TO ledger_owner;
    GRANT SELECT ON audit.rejections TO ledger_reader, ledger_app;
    """)


def downgrade() -> None:
    execute_script("DROP VIEW audit.rejections;")
