"""All configuration, read once from `LEDGER_*` environment variables and passed down."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrustPolicy(StrEnum):
    """How a portal's first `ONAPPINSTALL` may establish trust."""

    ALLOWLIST = "allowlist"  # only portals an operator allowed beforehand
    TOFU = "tofu"  # trust on first use: any portal's first install is trusted


class Settings(BaseSettings):
    """Service settings. Unset `database_url` means: run our own embedded PostgreSQL."""

    model_config = SettingsConfigDict(env_prefix="LEDGER_", frozen=True, extra="ignore")

    database_url: SecretStr | None = Field(
        default=None,
        description="DSN the service connects with (its restricted role); unset = embedded",
    )
    admin_database_url: SecretStr | None = Field(
        default=None,
        description="DSN with rights to migrate and create roles; defaults to database_url",
    )
    projector_database_url: SecretStr | None = Field(
        default=None,
        description="DSN the projector writes projections with (role ledger_projector); "
        "default: database_url with the user ledger_projector",
    )
    data_dir: Path = Field(default=Path(".ledger"), description="embedded database home")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a body not fully sent by then gets 408 (slow clients)"
    )
    max_form_fields: int = Field(default=10_000, ge=10, description="cap on keys per body")
    max_nesting: int = Field(default=32, ge=2, description="cap on bracket depth per key")
    trust_policy: TrustPolicy = TrustPolicy.ALLOWLIST
    bitrix24_rest_url: str = Field(
        default="https://{domain}/rest/",
        pattern=r"^https?://\S*\{domain\}\S*$",
        description="REST base an install admitted by a domain allowance is confirmed at "
        "(app.info); {domain} is the allowed domain",
    )
    bitrix24_app_code: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="this application's code as app.info names it (a local application's "
        "client_id, local.…): a domain allowance's confirmation refuses another application's "
        "token; unset: any application's",
    )
    confirm_require_admin: bool = Field(
        default=True, description="a domain allowance's confirmation also asks `profile` and "
        "refuses a token whose user is not an administrator of the portal",
    )
    confirm_timeout_seconds: float = Field(
        default=5.0, gt=0, description="a portal not confirming an install by then refuses it"
    )
    trust_refresh_seconds: float = Field(
        default=1.0, gt=0,
        description="how often serve re-reads trust changes made elsewhere (for outages)",
    )
    batch_max_events: int = Field(default=256, ge=1, description="group commit: flush at N")
    batch_max_delay_ms: float = Field(
        default=0.0, ge=0, description="group commit: under load, a batch may wait this long "
        "for more drafts (0: natural group commit — whatever arrived while the last batch "
        "committed; a draft finding the committer idle is committed at once)",
    )
    append_one_round_trip: bool = Field(
        default=True, description="append a batch of ordinary deliveries for portals whose "
        "trust the intake knows in one statement (`ledger.append_events`), checked under the "
        "head lock; false: every batch the long way (lock, facts, write, COMMIT)",
    )
    pool_size: int = Field(default=8, ge=2)
    rejection_excerpt_bytes: int = Field(default=2048, ge=0)
    rejections_per_second: float = Field(
        default=50.0, gt=0, description="rejection-log writes allowed per second (burst x2)"
    )
    log_level: str = "INFO"
    origin: str = Field(
        default="bitrix24-ledger", pattern=r"^\S+$",
        description="name of this ledger in signed checkpoints",
    )
    checkpoint_key: Path | None = Field(
        default=None, description="Ed25519 private key file (`ledger keys generate`)"
    )
    checkpoint_dir: Path | None = Field(
        default=None, description="`ledger serve` writes signed checkpoints here when set"
    )
    spool_dir: Path | None = Field(
        default=None, description="outage spool (default: LEDGER_DATA_DIR/spool)"
    )
    spool_max_bytes: int = Field(default=1024**3, ge=1024)
    offline_cache_entries: int = Field(
        default=65_536, ge=0,
        description="per worker: dedup keys of its recent commits kept for judging "
        "redeliveries during an outage (0: none; in memory only, ledger.recent)",
    )
    offline_cache_bytes: int = Field(
        default=32 * 1024**2, ge=0, description="per worker: the same cache's memory bound",
    )
    append_timeout_seconds: float = Field(
        default=5.0, gt=0, description="a slower append is treated as an outage (spooled)"
    )
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    spool_retry_seconds: float = Field(
        default=1.0, gt=0, description="how often to try draining while PostgreSQL is away"
    )
    worker: int = Field(default=0, ge=0, description="set by `serve --workers` per process")
    metrics_dir: Path | None = Field(
        default=None, description="set by `serve --workers`: the workers' shared metric files"
    )
    run_projector: bool = Field(
        default=True,
        description="`ledger serve` keeps the projections up to date (in a child process)",
    )
    projector_poll_seconds: float = Field(default=5.0, gt=0)
    projector_gather_ms: float = Field(
        default=1000.0, ge=0,
        description="commits closer than this are folded in one catch-up (projections lag by "
        "up to this much more; each catch-up costs the same round trips however much it folds)",
    )
    projector_nice: int = Field(
        default=10, ge=0, le=19, description="niceness of serve's projector process: it folds "
        "a second's events in one burst, which must not take the cores from the intake (the "
        "projections catch up right after); its PostgreSQL backends too, when local and ours",
    )
    projector_snapshot_every: int = Field(
        default=100_000, ge=1, description="save the fold state every N events (for --as-of)"
    )
    max_concurrent_folds: int = Field(
        default=2, ge=1, description="per process: \"as of\" answers folded at once (API and "
        "console); one more waits up to fold_wait_seconds, then gets 503 with Retry-After",
    )
    fold_wait_seconds: float = Field(
        default=0.5, ge=0, description="how long an \"as of\" question waits for a fold to "
        "finish when max_concurrent_folds are running",
    )
    projector_stall_seconds: float = Field(
        default=60.0, gt=0, description="readiness fails when the projector lags this long"
    )
    console_download_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="a console download (CSV or JSON Lines) "
        "larger than this is refused with a message to use `ledger export`: each is written "
        "to a temporary file (memory up to 4 MiB, then disk) before it is sent",
    )
    console_secure_cookie: bool = Field(
        default=False, description="console cookie Secure even over http (TLS ends at a proxy)"
    )
    log_summary_seconds: float = Field(
        default=60.0, gt=0,
        description="deliveries are logged one by one at DEBUG; at INFO, counted by outcome "
        "once per this interval (refusals are always logged, with their reason)",
    )
    shutdown_timeout_seconds: float = Field(
        default=10.0, gt=0,
        description="on SIGTERM, how long requests in progress may take to be answered",
    )
    task_restart_seconds: float = Field(
        default=0.1, gt=0,
        description="first wait before a crashed background task restarts (doubles to 30 s)",
    )
    checkpoint_every_events: int = Field(default=10_000, ge=1)
    checkpoint_every_seconds: float = Field(default=3600.0, gt=0)
    # gateway mode (ledger.gateway): forwarding stored deliveries to routes' destinations
    forward_max_age_seconds: float = Field(
        default=3600.0, gt=0, description="a forward not delivered by then is given up"
    )
    forward_timeout_seconds: float = Field(default=10.0, gt=0, description="per attempt")
    forward_retry_initial_seconds: float = Field(default=1.0, gt=0)
    forward_retry_max_seconds: float = Field(default=60.0, gt=0)
    forward_memory_bytes: int = Field(
        default=64 * 1024**2, ge=0, description="pending bodies kept in memory per route; "
        "older ones are read back from the outbox when their turn comes",
    )
    forward_max_pending: int = Field(
        default=100_000, ge=1, description="forwards pending per route; past it, given up"
    )
    forward_plain_http_hosts: str = Field(
        default="", description="comma-separated hosts routes may reach over plain http"
    )
    outbox_dir: Path | None = Field(
        default=None, description="encrypted forwarding outbox (default LEDGER_DATA_DIR/outbox)"
    )
    outbox_key: SecretStr | None = Field(
        default=None, description="base64 AES-256 key of the outbox (default: a key file)"
    )
    outbox_write_timeout_seconds: float = Field(
        default=2.0, gt=0, description="how long a delivery's answer waits for the outbox "
        "(a stalled disk); past it the forward is given up (outbox_stalled), recorded",
    )
    outbox_max_bytes: int = Field(
        default=2 * 1024**3, ge=0, description="the outboxes' size on disk (all workers'); "
        "past it new forwards are given up (outbox_full), recorded; 0: no bound",
    )
    forward_poll_seconds: float = Field(
        default=0.05, gt=0, description="how often the forwarder process looks for new "
        "records in the outbox",
    )
    forward_order_window_seconds: float = Field(
        default=0.25, ge=0, description="with several workers' outboxes, what the forwarder "
        "reads is held this long, then released in position order: a worker that committed "
        "an earlier position but appended it up to this much later still goes first",
    )
    forwarder_nice: int = Field(
        default=10, ge=0, le=19, description="niceness of serve's forwarder process (and of "
        "its PostgreSQL backends, when local): when CPU is short, intake goes first and "
        "forwarding catches up after (the outbox holds it)",
    )
    forward_status_seconds: float = Field(
        default=1.0, gt=0, description="how often the forwarder process publishes its "
        "status (route health, metrics) for the intake",
    )
    routes_reload_seconds: float = Field(
        default=2.0, gt=0, description="how soon a serving process notices route changes"
    )
    run_tree_follower: bool = Field(
        default=True, description="keep the Merkle tree up to date inside `ledger serve`"
    )
    tree_in_projector_process: bool = Field(
        default=False, description="set by `ledger serve` for its serving processes: the "
        "projector process grows the Merkle tree, and readiness judges it from the database",
    )
    tree_batch: int = Field(
        default=5000, ge=1, description="leaves the tree follower adds per transaction"
    )
    tree_poll_seconds: float = Field(default=1.0, gt=0)
    tree_gather_ms: float = Field(
        default=250.0, ge=0,
        description="the tree follower merges wake-ups this close into one transaction",
    )

    @property
    def spool_path(self) -> Path:
        """Each worker process has a spool of its own (one writer per file)."""
        return (self.spool_dir or self.data_dir / "spool") / f"worker-{self.worker}"

    @property
    def trust_dir(self) -> Path:
        """The offline trust state every worker shares: snapshot and journal (ledger.offline)."""
        return (self.spool_dir or self.data_dir / "spool") / "trust"

    @property
    def outbox_root(self) -> Path:
        """The workers' outboxes, and the forwarder process's files beside them."""
        return self.outbox_dir or self.data_dir / "outbox"

    @property
    def outbox_path(self) -> Path:
        """Each worker process has an outbox of its own (one writer per file)."""
        return self.outbox_root / f"worker-{self.worker}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def signing_key_path(self) -> Path:
        from ledger.checkpoints import PRIVATE_NAME

        return self.checkpoint_key or self.keys_dir / PRIVATE_NAME

    @property
    def embedded(self) -> bool:
        """Our own server only when no DSN at all is configured (never as a silent fallback)."""
        return self.database_url is None and self.admin_database_url is None
