"""A Merkle tree over the event chain (RFC 6962), and the signed checkpoints of its heads.

Every table is keyed by a log id: today one log (`events`, whose leaves are the event chain's
entry hashes), later one per portal plus a log of portal heads (docs/spec/merkle.md).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from ledger.migrations import execute_script

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script("""
    -- One row per log: which chain feeds it, and how far the tree has been built (the
    -- follower's checkpoint, moved in the same transaction as the nodes it adds).
    CREATE TABLE ledger.tree_logs (
        log_id      text PRIMARY KEY,
        source      text NOT NULL CHECK (source IN ('events')),
        size        bigint NOT NULL CHECK (size >= 0),
        root        bytea NOT NULL CHECK (length(root) = 32),
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    INSERT INTO ledger.tree_logs (log_id, source, size, root)
        VALUES ('events', 'events', 0, sha256(''::bytea));

    -- Perfect subtrees only: node (level, index) = MTH(leaves index*2^level ..
    -- (index+1)*2^level - 1). Written once, when its last leaf arrives; never changed.
    -- Level 0 (the leaf hashes, SHA-256(0x00 || chain hash)) is not stored: the chain has it.
    CREATE TABLE ledger.tree_nodes (
        log_id  text NOT NULL REFERENCES ledger.tree_logs (log_id),
        level   smallint NOT NULL CHECK (level BETWEEN 1 AND 63),
        index   bigint NOT NULL CHECK (index >= 0),
        hash    bytea NOT NULL CHECK (length(hash) = 32),
        PRIMARY KEY (log_id, level, index)
    );

    -- Every checkpoint the ledger signed, per log: what a proof is given against.
    CREATE TABLE ledger.tree_checkpoints (
        log_id      text NOT NULL REFERENCES ledger.tree_logs (log_id),
        size        bigint NOT NULL CHECK (size >= 0),
        root        bytea NOT NULL CHECK (length(root) = 32),
        signed_at   timestamptz NOT NULL,
        note        text NOT NULL,
        PRIMARY KEY (log_id, size, signed_at)
    );

    CREATE TRIGGER tree_nodes_no_update_delete BEFORE UPDATE OR DELETE ON ledger.tree_nodes
        FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER tree_nodes_no_truncate BEFORE TRUNCATE ON ledger.tree_nodes
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER tree_checkpoints_no_update_delete BEFORE UPDATE OR DELETE
        ON ledger.tree_checkpoints FOR EACH ROW EXECUTE FUNCTION ledger.forbid_change();
    CREATE TRIGGER tree_checkpoints_no_truncate BEFORE TRUNCATE ON ledger.tree_checkpoints
        FOR EACH STATEMENT EXECUTE FUNCTION ledger.forbid_change();

    ALTER TABLE ledger.tree_logs OWNER TO ledger_owner;
    ALTER TABLE ledger.tree_nodes OWNER TO ledger_owner;
    ALTER TABLE ledger.tree_checkpoints OWNER TO ledger_owner;
    GRANT SELECT, UPDATE ON ledger.tree_logs TO ledger_app;
    GRANT SELECT, INSERT ON ledger.tree_nodes, ledger.tree_checkpoints TO ledger_app;
    """)


def downgrade() -> None:
    execute_script("""
    DROP TABLE ledger.tree_checkpoints;
    DROP TABLE ledger.tree_nodes;
    DROP TABLE ledger.tree_logs;
    """)
