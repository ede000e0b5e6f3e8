"""Checking the store against its own chains and against signed checkpoints; making checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import checkpoints
from ledger.checkpoints import Checkpoint
from ledger.storage.store import EventStore
from ledger.verification import Anchor, ChainVerifier, Problem, event_row, rejection_row

STREAMS = {"events": event_row, "rejections": rejection_row}


@dataclass(frozen=True)
class StreamReport:
    stream: str
    verified: int
    head_position: int
    head_hash: bytes
    problem: Problem | None


async def verify_stream(
    store: EventStore,
    stream: str,
    *,
    anchor: Anchor | None = None,
    on_start: Callable[[int], None] = lambda total: None,
    on_progress: Callable[[int], None] = lambda rows: None,
) -> StreamReport:
    """Recompute one chain from position 1; stop at the first problem."""
    to_row = STREAMS[stream]
    verifier = ChainVerifier(stream, anchor=anchor)
    async with store.chain_snapshot(stream) as snapshot:
        on_start(snapshot.head_position)
        async for rows in snapshot.batches():
            for record in rows:
                if not verifier.feed(to_row(record)):
                    break
            on_progress(len(rows))
            if verifier.problem is not None:
                break
        problem = verifier.finish(snapshot.head_position, snapshot.head_hash)
        return StreamReport(
            stream, verifier.verified, snapshot.head_position, snapshot.head_hash, problem
        )


async def make_checkpoint(store: EventStore, key: Ed25519PrivateKey, origin: str) -> str:
    """A signed statement of the event chain's current head."""
    position, head_hash = await store.head()
    return checkpoints.sign(Checkpoint(origin, position, head_hash, datetime.now(UTC)), key)
