"""Every exception the ledger raises on purpose, in one module.

Each class carries what a caller needs to answer for it: `status` (the HTTP status, where the
failure can reach a client) and `code` (a stable machine-readable reason). The one root middleware
in `ledger.web` renders any `LedgerError` as JSON from these two attributes, and the CLI renders
the same classes as one line — no other code maps errors to statuses.

`status = 503` marks "try again later" failures (the store is away); `500` marks what should never
happen and is logged with its traceback wherever it is caught.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Root of every deliberate ledger failure."""

    status: int = 500
    code: str = "internal_error"
    # the HTTP connection cannot carry another request after this answer (its body stream is
    # broken), so the answer says `Connection: close` and the server reads no more of it
    closes_connection: bool = False
    # seconds after which trying again may succeed: the answer says `Retry-After` (a 503's)
    retry_after: int | None = None
    # logged where it arose, once for what it stands for: a 5xx the HTTP layer does not log
    # again for every request it answers (`ledger.web.errors_middleware`)
    logged_already: bool = False

    @property
    def message(self) -> str:
        return str(self)


class ConfigurationError(LedgerError):
    """The settings or the environment cannot work; the message says what to set or install."""

    code = "configuration_error"


class DatabaseUnavailable(LedgerError):
    """PostgreSQL could not be reached or answered with a connection-level failure."""

    status = 503
    code = "store_unavailable"


class LifecycleNotDrained(DatabaseUnavailable):
    """Online, a portal in this batch still waits on another worker's spooled lifecycle events:
    judged now by PostgreSQL's trust, it would be judged ahead of them. The batch is spooled
    (and drains after them) instead; nothing for an operator to do unless a worker stays down
    with its spool (see `/readyz`)."""

    code = "lifecycle_not_drained"


class LifecycleInDoubt(DatabaseUnavailable):
    """Offline, this portal's lifecycle is in doubt: a worker's online append of its install or
    uninstall may have committed (given up on at the append timeout, its connection lost or
    its worker killed with its COMMIT in flight). An install or uninstall judged without that
    commit and answered 202 could be refused on drain; so it is answered 503 (and, when nothing
    spooled stands for that commit, every delivery of the portal) until the doubt is settled:
    by that worker's drain, or by any worker that reaches PostgreSQL (within a second). Nothing
    for an operator to do unless it lasts: then no worker reaches PostgreSQL. Logged by the
    offline judge: one ERROR a doubt, the repeats counted in a WARNING at most every 10 s per
    portal."""

    code = "lifecycle_in_doubt"
    logged_already = True


class DatabaseMissing(ConfigurationError):
    """The configured database does not exist on the server (the message says how to create it)."""

    code = "database_missing"


class PermissionDenied(LedgerError):
    """PostgreSQL or the file system refused the action for lack of rights."""

    status = 403
    code = "permission_denied"


class SchemaNotMigrated(LedgerError):
    """The database schema is missing or behind the code's migrations."""

    status = 503
    code = "store_unavailable"

    def __init__(self, current: str | None, expected: str) -> None:
        self.current = current
        self.expected = expected
        super().__init__(
            f"database schema is at revision {current or 'none'}, the code needs {expected}: "
            "run `ledger migrate` (with an admin DSN in LEDGER_ADMIN_DATABASE_URL) first"
        )


class AppendFailed(LedgerError):
    """PostgreSQL refused a batch for a reason other than availability (a data error).

    The group committer retries the batch's items one by one, so one bad item fails alone.
    """

    status = 503
    code = "store_refused"


class SpoolFull(LedgerError):
    """The spool reached its size limit (or cannot be written); deliveries are refused until
    PostgreSQL is back."""

    status = 503
    code = "store_unavailable"


class SpoolBusy(ConfigurationError):
    """A worker's own spool is held by another process past the wait (`ledger.spool.claim_own`):
    two processes must never drain one spool. The message says what to stop."""

    code = "spool_busy"


class LockWaitTimeout(DatabaseUnavailable):
    """A file lock the offline state needs (the trust journal) was held by another process or
    thread past the bound: a stalled holder (stopped, on a hung disk). Handled as PostgreSQL
    being away would be — the batch is spooled, or answered 503 when the spool cannot judge it
    either — and never waited on by a thread without end."""

    code = "lock_wait_timeout"


class CommitterClosed(LedgerError):
    """The service is shutting down and takes no new deliveries."""

    status = 503
    code = "store_unavailable"


class DeliveryRejected(LedgerError):
    """A delivery that will not be stored as an event.

    `code` is a stable machine-readable reason (it is what the rejection log and metrics record);
    `status` the HTTP status the sender gets.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self._message = message
        super().__init__(f"{code}: {message}")

    @property
    def message(self) -> str:
        return self._message


class UnreadableBody(DeliveryRejected):
    """A body the HTTP layer could not read (broken gzip/deflate/br, a short chunked body)."""

    closes_connection = True

    def __init__(self, message: str) -> None:
        super().__init__(400, "malformed_body", message)


class BadQuery(LedgerError):
    """A read request that cannot be answered as asked (the message says why)."""

    status = 400
    code = "bad_query"


class DownloadTooLarge(BadQuery):
    """A console download would be larger than `console_download_max_bytes`: refused before
    anything is sent (it is written to a temporary file first, which must not fill the disk).
    The message names the `ledger export` command that writes any size, or a narrower filter."""

    code = "download_too_large"


class FoldsBusy(LedgerError):
    """Every permitted "as of" fold of this process is running, and none finished within the
    short wait: answered 503 with `Retry-After` rather than queued (each fold holds the
    registry as of then in memory and takes CPU from everything else the process serves). Ask
    again later; if it keeps happening, raise LEDGER_MAX_CONCURRENT_FOLDS or add workers."""

    status = 503
    code = "as_of_busy"

    def __init__(self, running: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"{running} 'as of' answers are being folded in this process already; ask again "
            f"in {retry_after} s (operators: LEDGER_MAX_CONCURRENT_FOLDS)"
        )


class PastTheHead(LedgerError):
    """An answer asked as of a position nothing is stored at yet: it would be the head's, under
    a label that looks pinned, and change as the next events arrive (the message names the
    head: ask as of it or earlier)."""

    status = 409
    code = "past_the_head"


class ReadsBusy(LedgerError):
    """As many read requests (read API, console) as this process lets use the database at once
    are running, and none finished within the wait: refused with `Retry-After` rather than
    left to take the pool's last connections, which the intake and /readyz need. Ask again
    later; if it keeps happening, raise LEDGER_POOL_SIZE or add workers."""

    status = 503
    code = "reads_busy"

    def __init__(self, running: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"{running} read requests are using the database in this process already; ask "
            f"again in {retry_after} s (operators: LEDGER_POOL_SIZE)"
        )


class BadInput(LedgerError):
    """An operator's input that does not have the shape it must have (the message says which)."""

    status = 400
    code = "bad_input"


class NotFound(LedgerError):
    """The portal, bot or resource asked for does not exist."""

    status = 404
    code = "not_found"


class Unauthorized(LedgerError):
    """A read request without a live bearer token."""

    status = 401
    code = "unauthorized"


class OperatorActionRefused(LedgerError):
    """The store would not record an operator's action (the message says why)."""

    status = 409
    code = "operator_action_refused"


class TokenExists(LedgerError):
    status = 409
    code = "token_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"a token named {name!r} exists; revoke it or choose another name")


class NoSuchToken(LedgerError):
    status = 404
    code = "no_such_token"

    def __init__(self, name: str) -> None:
        super().__init__(f"no live token named {name!r}; see `ledger tokens list`")


class CheckpointError(LedgerError):
    """A checkpoint or key that cannot be used; the message says which and why."""

    status = 400
    code = "bad_checkpoint"


# ---- gateway mode (ledger.gateway) ---------------------------------------------------------


class RouteRefused(LedgerError):
    """A route the ledger will not forward to (scheme, loop, pattern); the message says why."""

    status = 400
    code = "route_refused"


class NoSuchRoute(LedgerError):
    status = 404
    code = "no_such_route"

    def __init__(self, route_id: str) -> None:
        super().__init__(f"no route {route_id!r}; see `ledger routes list`")


class OutboxError(LedgerError):
    """The forwarding outbox or its key cannot be used; the message says which and why."""

    code = "outbox_error"


class OutboxKeyLost(OutboxError):
    """`keys/outbox.key` is missing while the outbox holds records sealed under a key: a new
    key would make them unreadable for good, so none is created (the message says what to do:
    restore the key, or give those forwards up)."""

    code = "outbox_key_lost"


class DestinationAnswerInvalid(LedgerError):
    """A route's destination answered a forward with something that is not HTTP/1.x the
    forwarder accepts (recorded as that attempt's error; the forward is retried)."""

    status = 502
    code = "destination_answer_invalid"


class TreeNotReady(LedgerError):
    """The Merkle tree cannot answer yet (not built that far, or no checkpoint covers the
    event); the message says what to run or wait for."""

    status = 409
    code = "tree_not_ready"


class ProofInvalid(LedgerError):
    """A proof bundle, consistency proof or cosignature that does not verify: the event is not
    in the signed log, or the logs diverged. The message names the first failed check."""

    status = 422
    code = "proof_invalid"


class WitnessRefused(LedgerError):
    """A witness will not cosign: the checkpoint does not extend what it cosigned before."""

    status = 409
    code = "witness_refused"


# ---- background tasks, the spool, stored records -------------------------------------------


class CodecError(LedgerError):
    """A stored record (spool record, fold snapshot) that does not decode as its type."""

    code = "undecodable_record"


class DeliveryNotStored(LedgerError):
    """Something unexpected failed while this delivery was being stored or spooled.

    The delivery was not acknowledged; the failure is logged with its traceback and counted in
    `ledger_batch_failures_total`. Its neighbours in the same batch were answered as usual.
    """

    status = 503
    code = "not_stored"


class SpoolUnwritable(LedgerError):
    """A spool write failed (and was undone), or could not be undone: the delivery was not
    acknowledged. While a failed write cannot be undone the spool accepts nothing; `/readyz`
    names the file and what to repair."""

    status = 503
    code = "store_unavailable"


class TaskCrashed(LedgerError):
    """A supervised background task crashed while this request waited on it; it is restarting
    (see the log and `ledger_task_failures_total`). Nothing was acknowledged."""

    status = 503
    code = "store_unavailable"
