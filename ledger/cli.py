"""The `ledger` command: serve, migrate, reach the database, manage portal trust.

Settings are read once here and passed down. Every failure the operator can act on ends in one
line on stderr and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

import click
import orjson
from pydantic import ValidationError

from ledger import checkpoints, exports, integrity, operations
from ledger.audit import MAX_PAGE, AuditService, DeletionFilter, new_token
from ledger.errors import LedgerError
from ledger.projections import readers
from ledger.projections.projector import PROJECTIONS, REGISTRY, Projector
from ledger.readmodels import EventOut
from ledger.settings import Settings
from ledger.storage import target as targets
from ledger.storage.audit_store import AuditStore, EventFilter
from ledger.storage.projection_store import ProjectionStore
from ledger.storage.store import EventStore, create_pool
from ledger.trust import TrustChange
from ledger.verification import Anchor

P = ParamSpec("P")
T = TypeVar("T")


def _fail_cleanly(func: Callable[P, T]) -> Callable[P, T]:
    """Ledger errors become one line and exit status 1, not a traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except LedgerError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.find_object(Settings)
    assert settings is not None
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ledger")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Audit ledger for Bitrix24 chatbot events.

    Configuration comes from LEDGER_* environment variables (see README). Without
    LEDGER_DATABASE_URL, an embedded PostgreSQL is started in LEDGER_DATA_DIR (./.ledger).
    """
    try:
        ctx.obj = Settings()
    except ValidationError as exc:
        raise click.ClickException(f"invalid LEDGER_* setting: {exc}") from exc
    logging.basicConfig(
        level=ctx.obj.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


@main.command()
@click.option("--host", default=None, help="Listen address (default: LEDGER_HOST, 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Listen port (default: LEDGER_PORT, 8080).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Processes sharing the port (SO_REUSEPORT); the first one also projects "
              "and writes checkpoints.")
@click.pass_context
@_fail_cleanly
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int) -> None:
    """Receive Bitrix24 events at POST /bitrix24/events and store them.

    On the embedded database the schema is migrated first; on an external one the service
    refuses to start until `ledger migrate` has run.
    """
    settings = _settings(ctx)
    address = (host or settings.host, port if port is not None else settings.port)
    if workers == 1:
        _serve(settings, *address, reuse_port=False)
        return
    # Start (and migrate) the database once, here, before the workers attach to it.
    target = asyncio.run(targets.open_target(settings))
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_serve, args=(_worker_settings(settings, i), *address),
                        kwargs={"reuse_port": True}, name=f"ledger-worker-{i}")
        for i in range(workers)
    ]
    for process in processes:
        process.start()

    def forward(signum: int, _: object) -> None:
        for process in processes:
            if process.pid is not None:
                os.kill(process.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for process in processes:
        process.join()
    target.release()
    failed = [p.name for p in processes if p.exitcode not in (0, -signal.SIGTERM)]
    if failed:
        raise click.ClickException(f"worker(s) {', '.join(failed)} failed; see the log above")


def _worker_settings(settings: Settings, index: int) -> Settings:
    if index == 0:
        return settings
    return settings.model_copy(
        update={"run_projector": False, "checkpoint_dir": None, "worker": index}
    )


def _serve(settings: Settings, host: str, port: int, *, reuse_port: bool) -> None:
    from aiohttp import web

    from ledger.web import create_app

    if reuse_port:  # a spawned worker: set up logging like the parent did
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    web.run_app(
        create_app(settings),
        host=host,
        port=port,
        reuse_port=reuse_port or None,
        print=lambda line: click.echo(line, err=True),
        access_log=None,
    )


@main.command()
@click.pass_context
@_fail_cleanly
def migrate(ctx: click.Context) -> None:
    """Bring the database schema (and its roles) up to date."""

    async def run() -> None:
        target = await targets.open_target(_settings(ctx))
        try:
            if target.embedded is None:  # the embedded one was migrated on opening
                await targets.migrate(target)
        finally:
            target.release()

    asyncio.run(run())
    click.echo("schema is up to date", err=True)


@main.group()
def db() -> None:
    """Reach the database the service uses."""


@db.command("url")
@click.option("--admin", is_flag=True, help="The superuser/migration DSN instead of the service's.")
@click.pass_context
@_fail_cleanly
def db_url(ctx: click.Context, admin: bool) -> None:
    """Print a DSN, so that `psql "$(ledger db url)"` works.

    Without --admin it is the service's own restricted role. The embedded server is left
    running for the DSN to be usable; `ledger db stop` stops it.
    """

    async def run() -> str:
        target = await targets.open_target(_settings(ctx), keep_running=True)
        return target.admin_dsn if admin else target.service_dsn

    click.echo(asyncio.run(run()))


@db.command("stop")
@click.pass_context
@_fail_cleanly
def db_stop(ctx: click.Context) -> None:
    """Stop the embedded PostgreSQL (no effect on an external database)."""
    settings = _settings(ctx)
    if not settings.embedded:
        raise click.ClickException("LEDGER_DATABASE_URL is set: the database is not ours to stop")

    async def run() -> None:
        target = await targets.open_target(settings)
        target.release()

    asyncio.run(run())


def _with_store(
    ctx: click.Context, work: Callable[[EventStore], Awaitable[T]]
) -> T:
    settings = _settings(ctx)

    async def run() -> T:
        target = await targets.open_target(settings)
        try:
            pool = await create_pool(target.service_dsn, size=2)
            try:
                await targets.require_current_schema(pool)
                return await work(EventStore(pool, policy=settings.trust_policy))
            finally:
                await pool.close()
        finally:
            target.release()

    return asyncio.run(run())


def _change_trust(ctx: click.Context, change: TrustChange, **target: str | None) -> int:
    return _with_store(ctx, lambda store: operations.change_trust(store, change, **target))


@main.group()
def portals() -> None:
    """Which Bitrix24 portals may write to the ledger."""


@portals.command("allow")
@click.option("--member-id", help="The portal's member_id (auth.member_id).")
@click.option("--domain", help="The portal's domain, e.g. some-domain.bitrix24.com.")
@click.pass_context
@_fail_cleanly
def portals_allow(ctx: click.Context, member_id: str | None, domain: str | None) -> None:
    """Allow a portal's next ONAPPINSTALL to establish its token."""
    if (member_id is None) == (domain is None):
        raise click.UsageError("give exactly one of --member-id or --domain")
    position = _change_trust(ctx, TrustChange.ALLOWED, member_id=member_id, domain=domain)
    click.echo(f"allowed {member_id or domain} (recorded at position {position})")


@portals.command("trust")
@click.option("--member-id", required=True, help="The portal's member_id.")
@click.option("--domain", help="The portal's domain, for the record.")
@click.option(
    "--token-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the application_token (kept out of shell history and `ps`).",
)
@click.pass_context
@_fail_cleanly
def portals_trust(
    ctx: click.Context, member_id: str, domain: str | None, token_file: Path
) -> None:
    """Provision the token of an app installed before the ledger existed (or replace it)."""
    token = token_file.read_text().strip()
    if not token:
        raise click.ClickException(f"{token_file} is empty")
    position = _change_trust(
        ctx, TrustChange.PROVISIONED, member_id=member_id, domain=domain, token=token
    )
    click.echo(f"trusted {member_id} (recorded at position {position})")


@portals.command("revoke")
@click.option("--member-id", required=True, help="The portal's member_id.")
@click.pass_context
@_fail_cleanly
def portals_revoke(ctx: click.Context, member_id: str) -> None:
    """End trust in a portal's token: its deliveries are refused from now on."""
    position = _change_trust(ctx, TrustChange.ENDED, member_id=member_id)
    click.echo(f"revoked {member_id} (recorded at position {position})")


@portals.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
@_fail_cleanly
def portals_list(ctx: click.Context, as_json: bool) -> None:
    """Show each portal's trust state."""
    rows = _with_store(ctx, lambda store: store.portals())
    if as_json:
        for row in rows:
            record: dict[str, Any] = {
                "member_id": row.member_id or None, "domain": row.domain, "state": row.state,
                "allowed": row.allowed, "token_fingerprint": row.token_fingerprint,
                "changed_at": row.changed_at.isoformat(),
                "changed_position": row.changed_position,
            }
            click.echo(orjson.dumps(record).decode())
        return
    header = f"{'MEMBER_ID':34} {'DOMAIN':32} {'STATE':8} {'TOKEN':12} {'SINCE':25} POSITION"
    click.echo(header)
    for row in rows:
        click.echo(
            f"{row.member_id or '-':34} {row.domain or '-':32} {row.state:8} "
            f"{row.token_fingerprint or '-':12} {row.changed_at.isoformat(timespec='seconds'):25} "
            f"{row.changed_position}"
        )


@main.command()
@click.option("--checkpoint", "checkpoint_file", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="A signed checkpoint the history must still match.")
@click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key file the checkpoint was signed with.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@_fail_cleanly
def verify(
    ctx: click.Context, checkpoint_file: Path | None, public_key: Path | None, quiet: bool
) -> None:
    """Recompute every hash of the event chain and the rejection chain.

    Exits 0 when both verify; otherwise 1, naming the first bad position and what is wrong
    (payload_changed, event_changed, event_missing, event_inserted, order_changed, head_mismatch,
    checkpoint_mismatch).
    """
    settings = _settings(ctx)
    anchor = None
    if checkpoint_file is not None:
        anchor = _read_anchor(checkpoint_file, public_key, settings)

    async def work(store: EventStore) -> list[integrity.StreamReport]:
        reports = []
        for stream in integrity.STREAMS:
            with _Progress(f"verifying {stream}", quiet) as bar:
                reports.append(await integrity.verify_stream(
                    store, stream, anchor=anchor if stream == "events" else None,
                    on_start=bar.start, on_progress=bar.advance,
                ))
        return reports

    async def record(store: EventStore) -> list[integrity.StreamReport]:
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
        return reports

    reports = _with_store(ctx, record)
    failed = False
    for report in reports:
        if report.problem is None:
            click.echo(f"{report.stream}: {report.verified} rows verified, head "
                       f"{report.head_position} {report.head_hash.hex()}")
        else:
            failed = True
            click.echo(f"{report.stream}: FAILED at {report.problem}", err=True)
    if anchor is not None and not failed:
        click.echo(f"checkpoint at position {anchor.position} matches")
    if failed:
        ctx.exit(1)


def _read_anchor(path: Path, public_key: Path | None, settings: Settings) -> Anchor:
    if public_key is None:
        raise click.UsageError("--checkpoint needs --public-key")
    origin, key = checkpoints.load_public_key(public_key)
    checkpoint = checkpoints.verify(path.read_text(), key, origin)
    return Anchor(checkpoint.position, checkpoint.head_hash)


class _Progress:
    """click's progress bar, started once the total is known."""

    def __init__(self, label: str, quiet: bool) -> None:
        self._label, self._quiet = label, quiet
        self._bar: Any = None

    def start(self, total: int) -> None:
        if not self._quiet:
            self._bar = click.progressbar(length=total, label=self._label, file=sys.stderr)
            self._bar.__enter__()

    def advance(self, rows: int) -> None:
        if self._bar is not None:
            self._bar.update(rows)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


@main.group()
def keys() -> None:
    """The Ed25519 key that signs checkpoints (kept outside the database)."""


@keys.command("generate")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Where to write the key pair (default: LEDGER_DATA_DIR/keys).")
@click.pass_context
@_fail_cleanly
def keys_generate(ctx: click.Context, directory: Path | None) -> None:
    """Make a new signing key (0600) and its public key file, to hand to auditors."""
    settings = _settings(ctx)
    private, public = checkpoints.generate_keys(directory or settings.keys_dir, settings.origin)
    click.echo(f"private key: {private} (keep it off the database host's backups)")
    click.echo(f"public key:  {public}")


@main.command()
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Signing key (default: LEDGER_CHECKPOINT_KEY or LEDGER_DATA_DIR/keys).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the statement here instead of standard output.")
@click.pass_context
@_fail_cleanly
def checkpoint(ctx: click.Context, key: Path | None, output: Path | None) -> None:
    """Write a signed statement of the event chain's head (origin, position, hash, time)."""
    settings = _settings(ctx)
    signing_key = checkpoints.load_private_key(key or settings.signing_key_path)
    text = _with_store(
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
@_fail_cleanly
def verify_checkpoint(checkpoint_file: Path, public_key: Path) -> None:
    """Check a checkpoint's signature with only the public key (no database needed)."""
    origin, key = checkpoints.load_public_key(public_key)
    checkpoint = checkpoints.verify(checkpoint_file.read_text(), key, origin)
    click.echo(f"valid: {checkpoint.origin} position {checkpoint.position} head "
               f"{checkpoint.head_hash.hex()} at {checkpoint.time.isoformat()}")


def _with_projections(
    ctx: click.Context,
    work: Callable[[ProjectionStore, Projector], Awaitable[T]],
) -> T:
    snapshot_every = _settings(ctx).projector_snapshot_every

    def run(store: EventStore) -> Awaitable[T]:
        projections = ProjectionStore(store.pool)
        return work(projections, Projector(store, projections, snapshot_every=snapshot_every))

    return _with_store(ctx, run)


def _parse_as_of(value: str | None) -> readers.AsOf:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is neither a position nor an ISO 8601 time") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


_AS_OF = click.option(
    "--as-of", help="A position or an ISO 8601 time (e.g. 2026-03-01T00:00:00Z): the answer "
    "the ledger would have given then, folded from the store.",
)
_PORTAL = click.option("--portal", "member_id", help="Only this portal (member_id).")
_JSON = click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")


def _print_rows(rows: list[Any], columns: list[str], as_json: bool) -> None:
    records = [readers.as_record(r) for r in rows]
    if as_json:
        for record in records:
            click.echo(orjson.dumps(record).decode())
        return
    widths = {c: max([len(c)] + [len(_cell(r[c])) for r in records]) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for record in records:
        click.echo("  ".join(_cell(record[c]).ljust(widths[c]) for c in columns))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


@main.command()
@_PORTAL
@click.option("--status", type=click.Choice(["active", "deleted"]))
@_AS_OF
@_JSON
@click.pass_context
@_fail_cleanly
def bots(
    ctx: click.Context, member_id: str | None, status: str | None, as_of: str | None,
    as_json: bool,
) -> None:
    """The bot registry: which bots exist on which portal, active or deleted, since when."""
    moment = _parse_as_of(as_of)
    rows = _with_projections(ctx, lambda p, j: readers.bots(
        p, j, member_id=member_id, status=status, as_of=moment))
    _print_rows(rows, ["member_id", "bot_id", "bot_code", "api_version", "status",
                       "first_seen_at", "last_activity_at", "message_count", "deleted_at",
                       "deleted_by"], as_json)


@main.command()
@_PORTAL
@_AS_OF
@_JSON
@click.pass_context
@_fail_cleanly
def deletions(ctx: click.Context, member_id: str | None, as_of: str | None, as_json: bool) -> None:
    """The deletion timeline: who deleted which bot when, and what it had done before."""
    moment = _parse_as_of(as_of)
    rows = _with_projections(ctx, lambda p, j: readers.deletions(
        p, j, member_id=member_id, as_of=moment))
    _print_rows(rows, ["occurred_at", "member_id", "bot_id", "bot_code", "actor_user_id",
                       "cause", "position", "message_count", "anomalies"], as_json)


@main.command()
@click.option("--once", is_flag=True, required=True,
              help="Drain every pending event into the projections and exit.")
@click.pass_context
@_fail_cleanly
def project(ctx: click.Context, once: bool) -> None:
    """Bring the projections up to date (`ledger serve` does this continuously)."""

    async def work(projections: ProjectionStore, projector: Projector) -> int:
        return await projector.catch_up()

    applied = _with_projections(ctx, work)
    click.echo(f"applied {applied} events")


@main.command()
@click.option("--projection", type=click.Choice(PROJECTIONS), default=REGISTRY,
              show_default=True, help="Which projection to rebuild.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@_fail_cleanly
def rebuild(ctx: click.Context, projection: str, quiet: bool) -> None:
    """Replay the store from position 0 and swap the result in atomically."""

    async def work(projections: ProjectionStore, projector: Projector) -> int:
        with _Progress(f"rebuilding {projection}", quiet) as bar:
            return await projector.rebuild(on_start=bar.start, on_progress=bar.advance)

    position = _with_projections(ctx, work)
    click.echo(f"{projection} rebuilt up to position {position}")


@main.group()
def roles() -> None:
    """Database roles for people and tools."""


@roles.command("create-reader")
@click.argument("name")
@click.pass_context
@_fail_cleanly
def roles_create_reader(ctx: click.Context, name: str) -> None:
    """A login role that can read the `audit` views and nothing else (prints its DSN)."""
    settings = _settings(ctx)
    password = secrets.token_urlsafe(24)

    async def run() -> str:
        target = await targets.open_target(settings)
        try:
            return await targets.create_reader(target, name, password)
        finally:
            target.release()

    click.echo(asyncio.run(run()))


@main.command()
@click.option("--url", help="Send to this intake URL, e.g. http://127.0.0.1:8080/bitrix24/events.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Instead of sending, write the deliveries as files into this directory.")
@click.option("--count", default=1000, show_default=True, help="How many deliveries at most.")
@click.option("--duration", type=float, help="Stop sending after this many seconds.")
@click.option("--concurrency", default=16, show_default=True, help="Requests in flight.")
@click.option("--rate", type=float, help="Deliveries per second (default: as fast as answered).")
@click.option("--portals", default=5, show_default=True, help="How many simulated portals.")
@click.option("--seed", default=1, show_default=True, help="Same seed, same traffic.")
@click.option("--provision", is_flag=True,
              help="Allow the simulated portals in this ledger's own database first.")
@click.pass_context
@_fail_cleanly
def simulate(
    ctx: click.Context, url: str | None, output: Path | None, count: int,
    duration: float | None, concurrency: int, rate: float | None, portals: int, seed: int,
    provision: bool,
) -> None:
    """Realistic Bitrix24 deliveries (form bodies as PHP encodes them), sent or written.

    Portals install, bots join chats, get messages, edits, commands, are deleted; apps are
    updated, uninstalled and reinstalled. Only the URL given is contacted.
    """
    from ledger import loadgen
    from ledger.simulation import Traffic

    if (url is None) == (output is None):
        raise click.UsageError("give exactly one of --url or --output")
    traffic = Traffic(seed=seed, portals=portals)
    if output is not None:
        written = loadgen.write_corpus(output, traffic, count)
        click.echo(f"wrote {written} deliveries to {output}")
        return
    if provision:

        async def allow_all(store: EventStore) -> None:
            for portal in traffic.portals:
                await operations.change_trust(
                    store, TrustChange.ALLOWED, member_id=portal.member_id
                )

        _with_store(ctx, allow_all)
    else:
        click.echo("the simulated portals must be allowed first (or pass --provision):", err=True)
        for portal in traffic.portals:
            click.echo(f"  ledger portals allow --member-id {portal.member_id}", err=True)
    assert url is not None
    report = asyncio.run(loadgen.send(
        url, traffic, count=count, concurrency=concurrency, rate=rate, duration=duration,
    ))
    click.echo(report.summary())


def _with_audit(ctx: click.Context, work: Callable[[AuditService], Awaitable[T]]) -> T:
    every = _settings(ctx).projector_snapshot_every
    return _with_store(
        ctx, lambda store: work(AuditService(store, catch_up=True, snapshot_every=every))
    )


@main.group()
def tokens() -> None:
    """Bearer tokens of the read API (/api/v1/)."""


@tokens.command("create")
@click.argument("name")
@click.pass_context
@_fail_cleanly
def tokens_create(ctx: click.Context, name: str) -> None:
    """Make a token; it is printed once and stored only as a hash."""
    token, digest = new_token()
    _with_audit(ctx, lambda a: a.audit.create_token(name, digest, operations.local_actor()))
    click.echo(token)


@tokens.command("revoke")
@click.argument("name")
@click.pass_context
@_fail_cleanly
def tokens_revoke(ctx: click.Context, name: str) -> None:
    """Stop a token from working (within seconds on running servers)."""
    _with_audit(ctx, lambda a: a.audit.revoke_token(name, operations.local_actor()))
    click.echo(f"revoked {name}")


@tokens.command("list")
@click.pass_context
@_fail_cleanly
def tokens_list(ctx: click.Context) -> None:
    """Names, creation and revocation of every token (never the tokens)."""
    for row in _with_audit(ctx, lambda a: a.audit.tokens()):
        state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "live"
        click.echo(f"{row['name']:24} {state:26} created {row['created_at']:%Y-%m-%d %H:%M} "
                   f"by {row['created_by']}")


def _event_filter(
    member_id: str | None, event_type: str | None, bot: int | None, since: str | None,
    until: str | None, after: int = 0,
) -> EventFilter:
    return EventFilter(
        member_id=member_id, event_type=event_type.upper() if event_type else None, bot_id=bot,
        received_from=_moment(since), received_to=_moment(until), after=after,
    )


def _moment(value: str | None) -> datetime | None:
    parsed = _parse_as_of(value)
    if isinstance(parsed, int):
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time")
    return parsed


_TYPE = click.option("--type", "event_type", help="Event type, e.g. ONIMBOTDELETE.")
_BOT = click.option("--bot", type=int, help="Events naming this bot id.")
_FROM = click.option("--from", "since", help="Received at or after (ISO 8601).")
_TO = click.option("--to", "until", help="Received before (ISO 8601).")


@main.command()
@click.option("--portal", "member_id", required=True, help="The portal (member_id).")
@click.option("--bot", type=int, required=True, help="The bot id.")
@_JSON
@click.pass_context
@_fail_cleanly
def history(ctx: click.Context, member_id: str, bot: int, as_json: bool) -> None:
    """One bot's whole life: every event that named it, with position, actor and hash."""

    async def work(audit: AuditService) -> list[EventOut]:
        result = await audit.bot_history(member_id, bot, limit=MAX_PAGE)
        items = list(result.events)
        after = result.next_after
        while after is not None:
            page = await audit.bot_history(member_id, bot, after=after, limit=MAX_PAGE)
            items += page.events
            after = page.next_after
        return items

    _print_events(_with_audit(ctx, work), as_json)


@main.command()
@_PORTAL
@_TYPE
@_BOT
@_FROM
@_TO
@click.option("--after", default=0, show_default=True, help="Start after this position.")
@click.option("--limit", default=100, show_default=True, help=f"At most this many (<= {MAX_PAGE}).")
@_JSON
@click.pass_context
@_fail_cleanly
def events(
    ctx: click.Context, member_id: str | None, event_type: str | None, bot: int | None,
    since: str | None, until: str | None, after: int, limit: int, as_json: bool,
) -> None:
    """Stored events in ledger order, filtered."""
    where = _event_filter(member_id, event_type, bot, since, until, after)
    page = _with_audit(ctx, lambda a: a.events(where, limit=limit))
    _print_events(page.items, as_json)
    if page.next_after is not None:
        click.echo(f"(more: --after {page.next_after})", err=True)


def _print_events(items: list[EventOut], as_json: bool) -> None:
    if as_json:
        for item in items:
            click.echo(item.model_dump_json(exclude_none=True))
        return
    click.echo(f"{'POSITION':>9}  {'RECEIVED':25}  {'EVENT':24} {'BOTS':12} {'ACTOR':7} HASH")
    for e in items:
        bots = ",".join(map(str, e.bot_ids)) or "-"
        click.echo(f"{e.position:>9}  {e.received_at.isoformat(timespec='seconds'):25}  "
                   f"{e.event_type:24} {bots:12} {e.actor_user_id or '-':7} {e.hash[:16]}")


@main.command()
@click.argument("kind", type=click.Choice(["events", "bots", "deletions"]))
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="jsonl",
              show_default=True)
@_PORTAL
@_TYPE
@_BOT
@_FROM
@_TO
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (and a FILE.manifest.json beside it); default standard output.")
@click.pass_context
@_fail_cleanly
def export(
    ctx: click.Context, kind: str, fmt: str, member_id: str | None, event_type: str | None,
    bot: int | None, since: str | None, until: str | None, output: Path | None,
) -> None:
    """Stream events, bots or deletions as CSV or JSON Lines, with a manifest.

    The manifest records the position range, the chain head at export time, the filters and
    the time, so an export can be tied back to `ledger verify`.
    """

    async def work(audit: AuditService) -> exports.Manifest:
        with contextlib.ExitStack() as stack:
            out: IO[str] = (stack.enter_context(output.open("w", newline=""))
                            if output else sys.stdout)
            if kind == "events":
                where = _event_filter(member_id, event_type, bot, since, until)
                bar = stack.enter_context(_Progress("exporting", output is None))
                return await exports.export_events(
                    audit, where, out, fmt, on_start=bar.start, on_progress=bar.advance
                )
            if kind == "bots":
                rows = await audit.bots(member_id=member_id)
                return await exports.export_rows("bots", rows, out, fmt,
                                                 {"member_id": member_id}, audit)
            where_d = DeletionFilter(member_id=member_id, occurred_from=_moment(since),
                                     occurred_to=_moment(until))
            rows_d = await audit.deletions(where_d)
            return await exports.export_rows("deletions", rows_d, out, fmt,
                                             dict(where_d.__dict__), audit)

    manifest = _with_audit(ctx, work)
    if output is None:
        click.echo(manifest.as_json().decode(), err=True)
    else:
        manifest_path = output.with_name(output.name + ".manifest.json")
        manifest_path.write_bytes(manifest.as_json())
        click.echo(f"{manifest.rows} {kind} written to {output}; manifest {manifest_path}",
                   err=True)
