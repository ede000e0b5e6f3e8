"""Proving history unchanged: verify, keys, checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from ledger import checkpoints, exports, integrity
from ledger.cli.app import main
from ledger.cli.common import (
    Progress,
    fail_cleanly,
    settings_of,
    with_store,
)
from ledger.settings import Settings
from ledger.storage.audit_store import AuditStore
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore
from ledger.verification import Anchor


@main.command()
@click.option("--checkpoint", "checkpoint_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="A signed checkpoint the history must still match.")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key file the checkpoint was signed with.")
@click.option("--projections", "check_projections", is_flag=True,
              help="Also fold the store from position 0 and compare every projection row, "
              "the chain head the projections recorded, and ledger.portal_trust with it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@fail_cleanly
def verify(
    ctx: click.Context, checkpoint_file: Path | None, public_key: Path | None,
    check_projections: bool, quiet: bool,
) -> None:
    """Recompute every hash of the event chain and the rejection chain.

    Exits 0 when both verify; otherwise 1, naming the first bad position and what is wrong
    (payload_changed, event_changed, event_missing, event_inserted, order_changed, head_mismatch,
    checkpoint_mismatch). Then recomputes every stored node of the Merkle tree from the chain
    and names the first bad one (tree_node_changed, tree_node_missing, tree_head_mismatch).
    With --projections, also 1 when derived state differs from a fold of the store, naming the
    first difference (table, key, column, stored and expected value).
    """
    settings = settings_of(ctx)
    anchor = None
    if checkpoint_file is not None:
        anchor = _read_anchor(checkpoint_file, public_key, settings)

    async def work(store: EventStore) -> list[integrity.StreamReport]:
        reports = []
        for stream in integrity.STREAMS:
            with Progress(f"verifying {stream}", quiet) as bar:
                reports.append(await integrity.verify_stream(
                    store, stream, anchor=anchor if stream == "events" else None,
                    on_start=bar.start, on_progress=bar.advance,
                ))
        return reports

    async def record(
        store: EventStore,
    ) -> tuple[list[integrity.StreamReport], integrity.TreeReport]:
        reports = await work(store)
        audit = AuditStore(store.pool)
        for report in reports:
            await audit.record_verification(
                stream=report.stream, verified_rows=report.verified,
                head_position=report.head_position, head_hash=report.head_hash,
                checkpoint_position=anchor.position if anchor and report.stream == "events"
                else None,
                problem=str(report.problem) if report.problem else None,
            )
        return reports, await integrity.verify_tree(store)

    async def record_all(
        store: EventStore,
    ) -> tuple[
        list[integrity.StreamReport], integrity.TreeReport, integrity.ProjectionReport | None
    ]:
        reports, tree = await record(store)
        if not check_projections:
            return reports, tree, None
        with Progress("verifying projections", quiet) as bar:
            projected = await integrity.verify_projections(
                ProjectionStore(store.pool), on_start=bar.start, on_progress=bar.advance
            )
        return reports, tree, projected

    reports, tree, projected = with_store(ctx, record_all)
    failed = tree.problem is not None
    for report in reports:
        if report.problem is None:
            click.echo(f"{report.stream}: {report.verified} rows verified, head "
                       f"{report.head_position} {report.head_hash.hex()}")
        else:
            failed = True
            click.echo(f"{report.stream}: FAILED at {report.problem}", err=True)
    if tree.problem is None:
        click.echo(f"tree {tree.log_id}: {tree.size} leaves, every stored node recomputed, "
                   f"root {tree.root.hex()}")
    else:
        click.echo(f"tree {tree.log_id}: FAILED at {tree.problem}", err=True)
    if anchor is not None and not failed:
        click.echo(f"checkpoint at position {anchor.position} matches")
    if projected is not None:
        if projected.difference is None:
            click.echo(f"projections: {projected.rows} rows match a fold of the store up to "
                       f"position {projected.position} {projected.head_hash.hex()}")
        else:
            failed = True
            click.echo(f"projections: FAILED at {projected.difference}", err=True)
    if failed:
        ctx.exit(1)


def _read_anchor(path: Path, public_key: Path | None, settings: Settings) -> Anchor:
    if public_key is None:
        raise click.UsageError("--checkpoint needs --public-key")
    origin, key = checkpoints.load_public_key(public_key)
    checkpoint = checkpoints.verify(path.read_text(), key, origin)
    return Anchor(checkpoint.position, checkpoint.head_hash)


@main.group()
def keys() -> None:
    """The Ed25519 key that signs checkpoints (kept outside the database)."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the key pair (default: LEDGER_DATA_DIR/keys).")
@click.pass_context
@fail_cleanly
def keys_generate(ctx: click.Context, directory: Path | None) -> None:
    """Make a new signing key (0600) and its public key file, to hand to auditors."""
    settings = settings_of(ctx)
    private, public = checkpoints.generate_keys(directory or settings.keys_dir, settings.origin)
    click.echo(f"private key: {private} (keep it off the database host's backups)")
    click.echo(f"public key:  {public}")


@main.command()
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Signing key (default: LEDGER_CHECKPOINT_KEY or LEDGER_DATA_DIR/keys).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the statement here instead of standard output.")
@click.pass_context
@fail_cleanly
def checkpoint(ctx: click.Context, key: Path | None, output: Path | None) -> None:
    """Write a signed checkpoint: origin, tree size, Merkle root, chain head, time (the tree is
    brought up to the chain first; docs/spec/proofs.md)."""
    settings = settings_of(ctx)
    signing_key = checkpoints.load_private_key(key or settings.signing_key_path)
    text = with_store(
        ctx, lambda store: integrity.make_checkpoint(store, signing_key, settings.origin)
    )
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)
        click.echo(f"checkpoint written to {output}", err=True)


@main.command("verify-checkpoint")
@click.argument("checkpoint_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--public-key", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@fail_cleanly
def verify_checkpoint(checkpoint_file: Path, public_key: Path) -> None:
    """Check a checkpoint's signature with only the public key (no database needed)."""
    origin, key = checkpoints.load_public_key(public_key)
    checkpoint = checkpoints.verify(checkpoint_file.read_text(), key, origin)
    click.echo(f"valid: {checkpoint.origin} position {checkpoint.position} head "
               f"{checkpoint.head_hash.hex()} at {exports.utc(checkpoint.time)}")
