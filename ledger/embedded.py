"""Our own PostgreSQL, for when no database URL is configured.

`pgserver` ships server binaries in a wheel and, when we run as root, runs the server as a separate
system user. Without it we fall back to `initdb`/`pg_ctl` on PATH. The server listens only on a
Unix socket and trusts local connections: it is private to this machine's users.

Its write-back settings (SETTINGS) are ours: at every start they are written to
`pgdata/ledger.conf`, which `postgresql.conf` includes on its first line, so that anything an
operator sets below that line (or with ALTER SYSTEM) wins.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
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


# What the embedded server writes back as it goes (bench/RESULTS.md, "Write-back" section).
# Every commit waits for a WAL fdatasync, and that waits behind whatever the disk is writing.
# Linux writes a file's dirty pages back once they are 30 s old, so a burst's pages go in one
# lump 30 s later. Most of them are the relations' new, zero-filled pages, which no PostgreSQL
# setting writes back early (the kernel's vm.dirty_background_bytes does: docs/operations.md).
# What PostgreSQL can do is keep the buffers it must write to make room out of the commit path
# and written back as they go: its defaults let the background writer clean at most 100 buffers
# per 200 ms (4 MB/s), less than a burst makes, so the backends answering deliveries write the
# rest themselves and leave them dirty (backend_flush_after 0). Here the background writer can
# clean ~160 MB/s (handing it to the disk every 512 kB, PostgreSQL's default) and a backend that
# still writes hands its writes to the disk every 256 kB. Durability is untouched: fsync,
# synchronous_commit and full_page_writes stay on. Values as SHOW prints them.
SETTINGS: dict[str, str] = {
    "bgwriter_delay": "50ms",
    "bgwriter_lru_maxpages": "1000",
    "backend_flush_after": "256kB",
}
CONF_NAME = "ledger.conf"
_INCLUDE = f"include_if_exists = '{CONF_NAME}'"
_CONF_HEADER = (
    "# Written by ledger at every start of its embedded PostgreSQL: edits here are lost.\n"
    "# To override a setting, set it in postgresql.conf below its first line (the include of\n"
    "# this file) or with ALTER SYSTEM SET; docs/operations.md says what each is for.\n"
)


def configure(pgdata: Path) -> bool:
    """Write SETTINGS to `pgdata/ledger.conf` and make `postgresql.conf` include it on its first
    line (settings later in the file, and ALTER SYSTEM, override it). True when something
    changed, so that a running server should re-read its configuration."""
    conf = pgdata / "postgresql.conf"
    if not conf.exists():
        return False
    body = _CONF_HEADER + "".join(f"{name} = '{value}'\n" for name, value in SETTINGS.items())
    target = pgdata / CONF_NAME
    changed = not target.exists() or target.read_text() != body
    if changed:
        _replace(target, body, like=conf)
    text = conf.read_text()
    if not any(line.startswith(_INCLUDE) for line in text.splitlines()):
        _replace(conf, f"{_INCLUDE}  # ledger's settings; yours below override them\n{text}",
                 like=conf)
        changed = True
    return changed


def _replace(path: Path, text: str, *, like: Path) -> None:
    """Write `path` whole or not at all (a server must never meet half a configuration file),
    owned and readable as `like` is: the server may run as another user (pgserver as root)."""
    stat = like.stat()
    # this process's own: two processes starting at once must not write one temporary file
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chown(temporary, stat.st_uid, stat.st_gid)
    temporary.chmod(stat.st_mode & 0o777 | 0o400)
    os.replace(temporary, path)


def _reload(pgdata: Path) -> None:
    """Ask a running server to re-read its configuration (SIGHUP to the postmaster)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.warning("embedded PostgreSQL: could not ask it to re-read %s (%s); it applies at "
                    "the next start", pgdata / CONF_NAME, exc)


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
        configure(pgdata)
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
    configure(pgdata)  # before a start: read at start-up (not yet there on a first start)
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
    if configure(pgdata):  # a first start (pgserver ran initdb), new settings, or one running
        _reload(pgdata)
    return EmbeddedHandle(socket_dir=server.socket_dir, port=server.port, server=server)
