"""Proofs an outsider can check: `ledger prove`, `verify-proof`, `prove-consistency`,
`verify-consistency`, and the witness's `ledger witness …` (docs/spec/proofs.md).

The verify commands and the witness need no database and no settings: only files and keys.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger import checkpoints, display, merkle, proofs, proving
from ledger.cli.app import main
from ledger.cli.common import fail_cleanly, settings_of, with_store
from ledger.errors import ProofInvalid, TreeNotReady, WitnessRefused
from ledger.storage.store import EventStore
from ledger.storage.tree_store import EVENTS_LOG, TreeStore

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT = click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
                    help="Write here instead of standard output.")


def _read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ProofInvalid(f"{path} is not JSON: {exc}") from exc


def _emit(document: dict[str, Any], output: Path | None) -> None:
    data = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    if output is None:
        click.echo(data.decode(), nl=False)
    else:
        output.write_bytes(data)
        click.echo(f"written to {output}", err=True)


@main.command()
@click.argument("position", type=click.IntRange(1, 2**63 - 1))
@click.option("--checkpoint", "checkpoint_file", type=_FILE,
              help="Prove against this signed checkpoint (default: the newest recorded one "
              "covering POSITION, or a new one signed with the checkpoint key).")
@_OUT
@click.pass_context
@fail_cleanly
def prove(
    ctx: click.Context, position: int, checkpoint_file: Path | None, output: Path | None
) -> None:
    """Write a self-contained proof that the event at POSITION is in the signed log."""
    settings = settings_of(ctx)
    given = checkpoint_file.read_text() if checkpoint_file is not None else None

    async def work(store: EventStore) -> dict[str, Any]:
        trees = TreeStore(store.pool)
        text = given
        if text is None:
            text = await trees.latest_checkpoint(EVENTS_LOG, position)
        if text is None:
            if not settings.signing_key_path.exists():
                raise TreeNotReady(f"no signed checkpoint covers position {position}; run "
                                   "`ledger checkpoint` or pass --checkpoint")
            key = checkpoints.load_private_key(settings.signing_key_path)
            text = await proving.make_checkpoint(trees, key, settings.origin)
        return await proving.inclusion_bundle(trees, position, text)

    _emit(with_store(ctx, work), output)


def _witness_keys(paths: tuple[Path, ...]) -> list[tuple[str, Ed25519PublicKey]]:
    return [checkpoints.load_public_key(p) for p in paths]


@main.command("verify-proof")
@click.argument("bundle", type=_FILE)
@click.option("--public-key", required=True, type=_FILE, help="The log operator's public key.")
@click.option("--witness-key", "witness_keys", multiple=True, type=_FILE,
              help="A witness's public key (repeat for several).")
@click.option("--min-witnesses", default=0, show_default=True, type=click.IntRange(0),
              help="How many of the given witnesses must have cosigned the checkpoint.")
@fail_cleanly
def verify_proof(
    bundle: Path, public_key: Path, witness_keys: tuple[Path, ...], min_witnesses: int
) -> None:
    """Check a proof bundle offline: the event hashes to its leaf, the leaf is in the tree,
    the tree is the one the operator signed (and the witnesses cosigned)."""
    origin, key = checkpoints.load_public_key(public_key)
    result = proofs.verify_inclusion(
        _read_json(bundle), key, origin, witnesses=_witness_keys(witness_keys),
        min_witnesses=min_witnesses,
    )
    witnessed = f", cosigned by {', '.join(result.witnesses)}" if result.witnesses else ""
    click.echo(display.terminal(
        f"valid: {result.event_type} of {result.member_id} at position "
        f"{result.position} is in {result.checkpoint.origin} at tree size "
        f"{result.checkpoint.position}{witnessed}"))


@main.command("prove-consistency")
@click.argument("old", type=_FILE)
@click.argument("new", type=_FILE)
@_OUT
@click.pass_context
@fail_cleanly
def prove_consistency(ctx: click.Context, old: Path, new: Path, output: Path | None) -> None:
    """Write a proof that the log at checkpoint NEW extends the log at checkpoint OLD."""
    old_text, new_text = old.read_text(), new.read_text()
    bundle = with_store(
        ctx, lambda store: proving.consistency_bundle(TreeStore(store.pool), old_text, new_text)
    )
    _emit(bundle, output)


@main.command("verify-consistency")
@click.argument("bundle", type=_FILE)
@click.option("--public-key", required=True, type=_FILE, help="The log operator's public key.")
@fail_cleanly
def verify_consistency(bundle: Path, public_key: Path) -> None:
    """Check offline that the newer checkpoint's log extends the older one's."""
    origin, key = checkpoints.load_public_key(public_key)
    result = proofs.verify_consistency(_read_json(bundle), key, origin)
    click.echo(f"valid: {origin} at tree size {result.new.position} extends tree size "
               f"{result.old.position}")


@main.group()
def witness() -> None:
    """Cosign the operator's checkpoints as an independent witness (c2sp.org/tlog-cosignature)."""


@witness.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", required=True,
              type=click.Path(file_okay=False, path_type=Path))
@fail_cleanly
def witness_keygen(name: str, directory: Path) -> None:
    """Make a witness key pair named NAME (e.g. auditor.example.com/witness)."""
    private, public = checkpoints.generate_keys(directory, name, stem="witness")
    origin, key = checkpoints.load_public_key(public)
    click.echo(f"private key: {private}\npublic key:  {public}\n"
               f"vkey:        {checkpoints.verifier_key(origin, key, checkpoints.COSIGNATURE)}")


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = _read_json(path)
    if not isinstance(state, dict) or not {"origin", "size", "root"} <= state.keys():
        raise WitnessRefused(f"{path} is not a witness state file; restore it from a backup")
    return state


def _save_state(path: Path, state: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    with temporary.open("wb") as handle:
        handle.write(orjson.dumps(state))
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


@witness.command("cosign")
@click.argument("checkpoint_file", type=_FILE)
@click.option("--key", required=True, type=_FILE, help="The witness's private key.")
@click.option("--name", required=True, help="The witness's key name.")
@click.option("--log-key", required=True, type=_FILE, help="The log operator's public key.")
@click.option("--state", "state_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The witness's memory: the last tree it cosigned (created on first use).")
@click.option("--proof", "proof_file", type=_FILE,
              help="Consistency bundle from the last cosigned tree to this one "
              "(`ledger prove-consistency`); needed once the witness has cosigned before.")
@_OUT
@fail_cleanly
def witness_cosign(
    checkpoint_file: Path, key: Path, name: str, log_key: Path, state_file: Path,
    proof_file: Path | None, output: Path | None,
) -> None:
    """Cosign CHECKPOINT if it extends the last tree this witness cosigned; refuse a fork."""
    origin, public = checkpoints.load_public_key(log_key)
    text = checkpoint_file.read_text()
    checkpoint = checkpoints.verify(text, public, origin)
    if checkpoint.root_hash is None:
        raise WitnessRefused("a chain-only checkpoint (no tree) cannot be witnessed")
    state = _load_state(state_file)
    if state is not None:
        if state["origin"] != origin:
            raise WitnessRefused(f"this state is for log {state['origin']!r}, not {origin!r}")
        old_size, old_root = int(state["size"]), bytes.fromhex(state["root"])
        if checkpoint.position < old_size:
            raise WitnessRefused(f"the checkpoint's tree ({checkpoint.position}) is smaller "
                                 f"than one already cosigned ({old_size}): a rollback")
        path: list[bytes] = []
        if checkpoint.position > old_size:
            if proof_file is None:
                raise WitnessRefused(
                    f"cosigned tree size {old_size} before: give --proof, a consistency bundle "
                    f"from it to {checkpoint.position} (`ledger prove-consistency`)")
            bundle = _read_json(proof_file)
            try:
                path = [bytes.fromhex(h) for h in bundle["proof"]]
            except (KeyError, TypeError, ValueError) as exc:
                raise WitnessRefused(f"{proof_file} is not a consistency bundle") from exc
        try:
            merkle.verify_consistency(old_size, old_root, checkpoint.position,
                                      checkpoint.root_hash, path)
        except merkle.ProofError as exc:
            raise WitnessRefused(
                f"REFUSED: the checkpoint does not extend the tree of size {old_size} this "
                f"witness cosigned ({exc}); the log may be showing a forked history") from exc
    cosigned = checkpoints.cosign(text, checkpoints.load_private_key(key), name, int(time.time()))
    _save_state(state_file, {"origin": origin, "size": checkpoint.position,
                             "root": checkpoint.root_hash.hex()})
    if output is None:
        click.echo(cosigned, nl=False)
    else:
        output.write_text(cosigned)
        click.echo(f"cosigned checkpoint written to {output}", err=True)
