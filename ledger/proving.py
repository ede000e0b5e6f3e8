"""Keeping the Merkle tree up to date, and making proofs from it (for the CLI and the API).

The follower grows the tree after the append, never inside it: woken by the chain's NOTIFY
(a hint), or every poll interval, it extends the tree a batch per transaction until it holds the
whole chain — so it lags the chain by at most the batch being committed, and the append path
pays nothing for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import checkpoints, merkle, proofs
from ledger.checkpoints import Checkpoint
from ledger.errors import LedgerError, NotFound, ProofInvalid, TreeNotReady
from ledger.hashing import GENESIS_HASH
from ledger.storage.notifications import listen_forever
from ledger.storage.tree_store import EVENTS_LOG, TreeStore

log = logging.getLogger(__name__)


class TreeFollower:
    def __init__(self, trees: TreeStore, *, log_id: str = EVENTS_LOG, batch: int = 5000) -> None:
        self._trees, self._log_id, self._batch = trees, log_id, batch
        self.size = 0
        self._wake = asyncio.Event()
        self._grown = asyncio.Condition()

    def wake(self) -> None:
        self._wake.set()

    async def catch_up(self) -> int:
        """Extend, a batch per transaction, until the tree holds what the chain held."""
        while True:
            size, added = await self._trees.extend(self._log_id, limit=self._batch)
            async with self._grown:
                self.size = size
                self._grown.notify_all()
            if added < self._batch:
                return size

    async def wait_for(self, size: int) -> None:
        """Until the tree holds `size` leaves (bound it with asyncio.timeout)."""
        async with self._grown:
            await self._grown.wait_for(lambda: self.size >= size)

    async def run(
        self, listen_dsn: str, *, poll_seconds: float = 1.0, gather_seconds: float = 0.25
    ) -> None:
        """Catch up whenever woken (NOTIFY) or every `poll_seconds`, until cancelled.

        Wake-ups closer than `gather_seconds` are merged: one transaction then adds the leaves
        of several commits, instead of one per commit competing with the appends.
        """
        loop = asyncio.get_running_loop()
        listener = asyncio.create_task(
            listen_forever(listen_dsn, "ledger_events", self.wake), name="tree-listen"
        )
        try:
            while True:
                self._wake.clear()
                began = loop.time()
                try:
                    await self.catch_up()
                except LedgerError as exc:  # the database may be away: next wake or poll
                    log.warning("Merkle tree could not catch up: %s", exc)
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives as the wake-up does, and shutdown would wait for ever
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(poll_seconds):
                        await self._wake.wait()
                # pacing: at most one transaction per gather window, holding every commit in it
                await asyncio.sleep(max(0.0, began + gather_seconds - loop.time()))
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def make_checkpoint(
    trees: TreeStore, key: Ed25519PrivateKey, origin: str, *, log_id: str = EVENTS_LOG
) -> str:
    """Bring the tree up to the chain, then sign (and record) its head."""
    await trees.catch_up(log_id)
    head = await trees.head(log_id)
    now = datetime.now(UTC)
    text = checkpoints.sign(
        Checkpoint(origin, head.size, head.leaf or GENESIS_HASH, now, head.root), key
    )
    await trees.record_checkpoint(log_id, head.size, head.root, now, text)
    return text


def _signed_tree(text: str) -> tuple[int, bytes]:
    """Size and root a checkpoint states, read without its signature (the verifier checks it;
    here it only chooses which tree to prove against)."""
    lines = checkpoints.parse_note(text).body.decode().split("\n")
    try:
        if len(lines) < 4 or not lines[3].startswith("chain-head "):
            raise ValueError("a chain-only checkpoint from before the tree: it states no root")
        return checkpoints.tree_size(lines[1]), base64.b64decode(lines[2], validate=True)
    except ValueError as exc:
        raise ProofInvalid(f"cannot prove against this checkpoint: {exc}") from exc


async def inclusion_bundle(
    trees: TreeStore, position: int, checkpoint_text: str | None, *, log_id: str = EVENTS_LOG
) -> dict[str, Any]:
    """A self-contained proof that the event at `position` is in the signed log: against
    `checkpoint_text`, or the newest recorded checkpoint that covers it."""
    if not 1 <= position < 2**63:  # a position is a bigint: anything else names no event
        raise NotFound(f"no event at position {position}")
    if checkpoint_text is None:
        checkpoint_text = await trees.latest_checkpoint(log_id, position)
        if checkpoint_text is None:
            raise TreeNotReady(
                f"no signed checkpoint covers position {position} yet; wait for the next one "
                "(or run `ledger checkpoint`)"
            )
    size, root = _signed_tree(checkpoint_text)
    if position > size:
        raise TreeNotReady(f"the checkpoint covers positions 1..{size}, not {position}")
    nodes, row = await trees.proof_material(log_id, size, leaf_position=position)
    if row is None:
        raise NotFound(f"no event at position {position}")
    if merkle.root_from(size, nodes) != root:
        raise ProofInvalid(
            f"the stored tree at size {size} does not have the checkpoint's root: this "
            "database's history differs from the one that was signed; run `ledger verify`"
        )
    path = merkle.hashes_for(merkle.inclusion_ranges(position - 1, size), nodes)
    return proofs.inclusion_bundle(log_id, row, size, path, checkpoint_text)


async def consistency_bundle(
    trees: TreeStore, old_text: str, new_text: str, *, log_id: str = EVENTS_LOG
) -> dict[str, Any]:
    """A proof that the log at `new_text` extends the log at `old_text` (from the stored tree:
    if this database's history is not the one signed in `old_text`, the proof fails)."""
    old_size, _ = _signed_tree(old_text)
    new_size, new_root = _signed_tree(new_text)
    if old_size > new_size:
        raise ProofInvalid(f"the older checkpoint ({old_size}) is larger than the newer "
                           f"({new_size}): give OLD first")
    nodes, _ = await trees.proof_material(log_id, new_size, old_size=old_size)
    if merkle.root_from(new_size, nodes) != new_root:
        raise ProofInvalid(f"the stored tree at size {new_size} does not have the newer "
                           "checkpoint's root; run `ledger verify`")
    path = (merkle.hashes_for(merkle.consistency_ranges(old_size, new_size), nodes)
            if 0 < old_size < new_size else [])
    return proofs.consistency_bundle(log_id, old_text, new_text, path)
