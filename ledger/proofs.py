"""Proof bundles: what `ledger prove` writes and `ledger verify-proof` checks, offline.

Pure code: a bundle carries everything its check needs (the event as stored, its audit path,
the signed checkpoint), so a verifier needs only the operator's public key — no database, no
settings. The format is specified in docs/spec/proofs.md; every check below is one step there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import checkpoints, merkle
from ledger.checkpoints import Checkpoint
from ledger.errors import ProofInvalid
from ledger.hashing import chain_hash, timestamp_text
from ledger.verification import ChainRow, event_row

INCLUSION = "ledger-inclusion-proof/v1"
CONSISTENCY = "ledger-consistency-proof/v1"
MAX_PATH = 128  # two per level of a 2^64-leaf tree: anything longer is not a proof


def _hex(value: bytes | None) -> str | None:
    return None if value is None else bytes(value).hex()


def event_document(row: Any) -> dict[str, Any]:
    """An event row as stored, in JSON: payload and metadata as their exact stored text."""
    return {
        "position": row["position"],
        "member_id": row["member_id"],
        "event_type": row["event_type"],
        "origin": row["origin"],
        "bot_ids": list(row["bot_ids"]),
        "occurred_at": timestamp_text(row["occurred_at"]),
        "received_at": timestamp_text(row["received_at"]),
        "dedup_key": _hex(row["dedup_key"]),
        "body_sha256": _hex(row["body_sha256"]),
        "payload": row["payload"],
        "payload_sha256": _hex(row["payload_sha256"]),
        "metadata": row["metadata"],
        "prev_hash": _hex(row["prev_hash"]),
        "hash": _hex(row["hash"]),
    }


def inclusion_bundle(
    log_id: str, row: Any, tree_size: int, path: list[bytes], checkpoint: str
) -> dict[str, Any]:
    return {
        "format": INCLUSION,
        "log_id": log_id,
        "event": event_document(row),
        "leaf": bytes(row["hash"]).hex(),
        "leaf_index": row["position"] - 1,
        "tree_size": tree_size,
        "audit_path": [h.hex() for h in path],
        "checkpoint": checkpoint,
    }


def consistency_bundle(
    log_id: str, old: str, new: str, path: list[bytes]
) -> dict[str, Any]:
    return {
        "format": CONSISTENCY,
        "log_id": log_id,
        "old_checkpoint": old,
        "new_checkpoint": new,
        "proof": [h.hex() for h in path],
    }


def _chains(row: ChainRow) -> bool:
    """The event's recomputed chain hash is its stored one (metadata hashed as stored, or
    re-canonicalised when it was stored in another layout)."""
    if chain_hash(row.prev_hash, row.position, row.entry, row.content_sha256) == row.hash:
        return True
    try:
        entry = row.reparsed() if row.reparsed is not None else None
    except ValueError:  # not JSON at all
        return False
    return entry is not None and (
        chain_hash(row.prev_hash, row.position, entry, row.content_sha256) == row.hash
    )


@dataclass(frozen=True, slots=True)
class Inclusion:
    position: int
    event_type: str
    member_id: str
    checkpoint: Checkpoint
    witnesses: list[str]


def _moment(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _bytes(value: Any, size: int = 32) -> bytes:
    if not isinstance(value, str):
        raise ValueError("a hash must be a hex string")
    decoded = bytes.fromhex(value)
    if len(decoded) != size:
        raise ValueError(f"a hash must be {size} bytes")
    return decoded


def _path(values: Any) -> list[bytes]:
    if not isinstance(values, list) or len(values) > MAX_PATH:
        raise ValueError(f"a path is a list of at most {MAX_PATH} hashes")
    return [_bytes(v) for v in values]


def _tree_checkpoint(
    text: Any, public: Ed25519PublicKey, origin: str
) -> Checkpoint:
    if not isinstance(text, str):
        raise ProofInvalid("the bundle holds no checkpoint")
    checkpoint = checkpoints.verify(text, public, origin)
    if checkpoint.root_hash is None:
        raise ProofInvalid("the checkpoint is chain-only (from before the tree): it proves no "
                           "inclusion; take a new one with `ledger checkpoint`")
    return checkpoint


def _witnessed(
    text: str, witnesses: list[tuple[str, Ed25519PublicKey]], minimum: int
) -> list[str]:
    names = checkpoints.cosigned_by(text, witnesses)
    if len(names) < minimum:
        raise ProofInvalid(f"the checkpoint carries {len(names)} valid witness cosignature(s) "
                           f"of the keys given, {minimum} required")
    return names


def verify_inclusion(
    bundle: Any,
    public: Ed25519PublicKey,
    origin: str,
    *,
    witnesses: list[tuple[str, Ed25519PublicKey]] | None = None,
    min_witnesses: int = 0,
) -> Inclusion:
    """Check a proof bundle end to end; raise `ProofInvalid` (or `CheckpointError`) naming
    the first check that fails."""
    if not isinstance(bundle, dict) or bundle.get("format") != INCLUSION:
        raise ProofInvalid(f"not a {INCLUSION} bundle")
    checkpoint = _tree_checkpoint(bundle.get("checkpoint"), public, origin)
    assert checkpoint.root_hash is not None
    try:
        event = bundle["event"]
        record = {
            **event,
            "occurred_at": _moment(event["occurred_at"]),
            "received_at": _moment(event["received_at"]),
            "dedup_key": _bytes(event["dedup_key"]),
            "body_sha256": None if event["body_sha256"] is None
            else _bytes(event["body_sha256"]),
            "payload_sha256": _bytes(event["payload_sha256"]),
            "prev_hash": _bytes(event["prev_hash"]),
            "hash": _bytes(event["hash"]),
        }
        if not isinstance(record["payload"], str) or not isinstance(record["metadata"], str):
            raise ValueError("payload and metadata are the stored JSON text")
        if type(event["position"]) is not int or not isinstance(event["bot_ids"], list):
            raise ValueError("position is an integer and bot_ids a list")
        row = event_row(record)
        position, leaf = int(event["position"]), _bytes(bundle["leaf"])
        index, size = int(bundle["leaf_index"]), int(bundle["tree_size"])
        path = _path(bundle["audit_path"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofInvalid(f"malformed proof bundle: {exc!r}") from exc
    if not row.content_ok:
        raise ProofInvalid("the event's payload does not hash to its payload_sha256")
    if not _chains(row):
        raise ProofInvalid("the event does not hash to its chain entry hash: it was altered")
    if leaf != row.hash or index != position - 1:
        raise ProofInvalid("the leaf is not this event's chain entry hash at its position")
    if size != checkpoint.position:
        raise ProofInvalid(f"the proof is for a tree of {size} leaves, the checkpoint states "
                           f"{checkpoint.position}")
    if position == size and checkpoint.head_hash != row.hash:
        raise ProofInvalid("the checkpoint's chain head is not this event's hash")
    try:
        merkle.verify_inclusion(leaf, index, size, path, checkpoint.root_hash)
    except merkle.ProofError as exc:
        raise ProofInvalid(f"inclusion proof fails: {exc}") from exc
    names = _witnessed(bundle["checkpoint"], witnesses or [], min_witnesses)
    return Inclusion(position, str(event["event_type"]), str(event["member_id"]), checkpoint,
                     names)


@dataclass(frozen=True, slots=True)
class Consistency:
    old: Checkpoint
    new: Checkpoint


def verify_consistency(bundle: Any, public: Ed25519PublicKey, origin: str) -> Consistency:
    """Check that the newer checkpoint's log extends the older one's; raise `ProofInvalid`."""
    if not isinstance(bundle, dict) or bundle.get("format") != CONSISTENCY:
        raise ProofInvalid(f"not a {CONSISTENCY} bundle")
    old = _tree_checkpoint(bundle.get("old_checkpoint"), public, origin)
    new = _tree_checkpoint(bundle.get("new_checkpoint"), public, origin)
    try:
        path = _path(bundle["proof"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProofInvalid(f"malformed consistency bundle: {exc!r}") from exc
    check_consistency(old, new, path)
    return Consistency(old, new)


def check_consistency(old: Checkpoint, new: Checkpoint, path: list[bytes]) -> None:
    assert old.root_hash is not None
    assert new.root_hash is not None
    try:
        merkle.verify_consistency(old.position, old.root_hash, new.position, new.root_hash, path)
    except merkle.ProofError as exc:
        raise ProofInvalid(f"consistency proof fails: {exc}") from exc
