"""Our own PostgreSQL, for when no database URL is configured.

`pgserver` ships server binaries in a wheel and, when we run as root, runs the server as a separate
system user. Without it we fall back to `initdb`/`pg_ctl` on PATH. The server listens only on a
Unix socket and trusts local connections: it is private to this machine's users.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ledger.errors import ConfigurationError

log = logging.getLogger(__name__)

ADMIN_USER = "postgres"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.5432"


class _Server(Protocol):
    def stop(self) -> None: ...


@dataclass(frozen=True)
class EmbeddedHandle:
    """A running embedded server: where its socket is, and how to let it go."""

    socket_dir: Path
    port: int
    server: _Server

    def dsn(self, database: str, user: str = ADMIN_USER) -> str:
        return f"postgresql://{user}@/{database}?host={self.socket_dir}&port={self.port}"


class _PgServer:
    def __init__(self, pgdata: Path, *, keep_running: bool) -> None:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (CI shells): harmless here
            warnings.simplefilter("ignore")
            from pgserver import postgres_server

        mode = None if keep_running else "stop"
        self._server: Any = postgres_server.get_server(pgdata, cleanup_mode=mode)
        # get_server returns this process's cached handle as it was first made: a later
        # `db stop` in the same process (tests) must still stop what `db url` kept running
        self._server.cleanup_mode = mode
        _forget_dead_users(self._server)
        info = self._server.get_postmaster_info()
        self.socket_dir = Path(info.socket_dir)
        self.port = int(info.port or 5432)

    def stop(self) -> None:
        self._server.cleanup()


def _forget_dead_users(server: Any) -> None:
    """pgserver counts the processes using a server by pid and stops it when the last one lets
    go; one killed with -9 never lets go, and the server then outlived every later run of the
    service. Pids no longer alive are dropped (pgserver has no API for it: its own list, under
    its own lock)."""
    users, lock = getattr(server, "global_process_id_list", None), getattr(server, "_lock", None)
    if users is None or lock is None:
        return
    with lock:
        pids = users.get()
        alive = [pid for pid in pids if _alive(pid)]
        if alive != pids:
            log.info("embedded PostgreSQL: forgetting users that died without letting go: %s",
                     sorted(set(pids) - set(alive)))
            users.put(alive)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


class _PathBinaries:
    """initdb/pg_ctl from PATH; PostgreSQL refuses to run as root, so this needs a normal user."""

    def __init__(self, pgdata: Path, *, keep_running: bool) -> None:
        initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise ConfigurationError(
                "no embedded PostgreSQL available: `pip install pgserver`, install PostgreSQL "
                "server binaries (initdb, pg_ctl) on PATH, or set LEDGER_DATABASE_URL"
            )
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            raise ConfigurationError(
                "PostgreSQL on PATH cannot run as root: `pip install pgserver` (it handles root) "
                "or set LEDGER_DATABASE_URL"
            )
        self._pg_ctl, self._pgdata, self._keep = pg_ctl, pgdata, keep_running
        if not (pgdata / "PG_VERSION").exists():
            subprocess.run(  # noqa: S603 - fixed argv, no shell
                [initdb, "-D", str(pgdata), "--auth=trust", "-U", ADMIN_USER, "-E", "UTF8"],
                check=True,
                capture_output=True,
            )
        socket_dir = pgdata / "run"
        if len(str(socket_dir)) > _SOCKET_PATH_MAX:
            socket_dir = Path(tempfile.mkdtemp(prefix="ledger-pg-"))
        socket_dir.mkdir(exist_ok=True)
        self.socket_dir, self.port = socket_dir, 5432
        status = subprocess.run(  # noqa: S603
            [pg_ctl, "-D", str(pgdata), "status"], capture_output=True, check=False
        )
        if status.returncode != 0:
            subprocess.run(  # noqa: S603
                [pg_ctl, "-D", str(pgdata), "-w", "-l", str(pgdata / "log"),
                 "-o", f"-h '' -k {socket_dir}", "start"],
                check=True,
                capture_output=True,
            )

    def stop(self) -> None:
        if not self._keep:
            subprocess.run(  # noqa: S603
                [self._pg_ctl, "-D", str(self._pgdata), "-w", "-m", "fast", "stop"],
                capture_output=True,
                check=False,
            )


def start(data_dir: Path, *, keep_running: bool = False) -> EmbeddedHandle:
    """Start (or attach to) the embedded server whose data lives in `data_dir/pgdata`."""
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    server: _PgServer | _PathBinaries
    try:
        server = _PgServer(pgdata, keep_running=keep_running)
    except ImportError:
        log.warning("pgserver is not installed; trying PostgreSQL binaries on PATH")
        server = _PathBinaries(pgdata, keep_running=keep_running)
    except subprocess.SubprocessError as exc:
        raise ConfigurationError(
            f"the embedded PostgreSQL in {pgdata} did not start ({exc}); see {pgdata / 'log'}"
        ) from exc
    return EmbeddedHandle(socket_dir=server.socket_dir, port=server.port, server=server)
