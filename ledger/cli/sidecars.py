"""Child processes `ledger serve` runs beside its workers, kept alive and stopped with it.

A sidecar is one `ledger …` command (its own process: it shares no event loop or GIL with the
intake), started once per service whatever `--workers` says. When it dies it is started again
after a backoff that doubles up to `max_backoff` and resets after a run of `stable_after`
seconds; every death is logged as an error with its exit status and how many came in a row, so
a crash loop is plain in the log. The child is told the serving process's pid and exits when
that is no longer its parent (a `kill -9` of `serve` leaves no orphan).

Adding one: a `Sidecar(name, [subcommand, …], env)` more in `ledger.cli.service._sidecars`.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import click

log = logging.getLogger(__name__)


class Sidecar:
    """One supervised child: `python -m ledger <args> --parent-pid <ours>`."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        first_backoff: float = 1.0,
        max_backoff: float = 30.0,
        stable_after: float = 60.0,
        stop_seconds: float = 10.0,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        """`env`: added to this process's environment for the child; `on_exit(pid)` is called
        after each run (e.g. to retire its metric files)."""
        self.name = name
        self._argv = [sys.executable, "-m", "ledger", *args, "--parent-pid", str(os.getpid())]
        self._env = {**os.environ, **(env or {})}
        self._first, self._max, self._stable = first_backoff, max_backoff, stable_after
        self._stop_seconds = stop_seconds
        self._on_exit = on_exit
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._spawn()
        if self._process is None:
            raise click.ClickException(f"could not start {self.name}; see the log above")
        self._thread = threading.Thread(target=self._watch, name=f"sidecar-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """SIGTERM the child, and SIGKILL it if it has not exited within `stop_seconds`."""
        with self._lock:  # no new child after this (`_spawn` checks under the same lock)
            self._stopping.set()
            process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self._stop_seconds)
            except subprocess.TimeoutExpired:
                log.error("%s (pid %d) did not stop within %gs of SIGTERM; killing it",
                          self.name, process.pid, self._stop_seconds)
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join()

    def _spawn(self) -> bool:
        with self._lock:
            if self._stopping.is_set():
                return False
            try:
                self._process = process = subprocess.Popen(  # noqa: S603 - our own argv
                    self._argv, env=self._env, stdin=subprocess.DEVNULL)
            except OSError as exc:  # the watcher sees the old, dead one and tries again
                log.error("could not start %s: %s", self.name, exc)
                return True
        log.info("started %s (pid %d)", self.name, process.pid)
        return True

    def _watch(self) -> None:
        backoff, in_a_row = self._first, 0
        while True:
            with self._lock:
                process = self._process
            assert process is not None
            began = time.monotonic()
            status = process.wait()
            if self._on_exit is not None:
                self._on_exit(process.pid)
            if self._stopping.is_set():
                return
            lasted = time.monotonic() - began
            if lasted >= self._stable:
                backoff, in_a_row = self._first, 0
            in_a_row += 1
            log.error("%s (pid %d) exited with status %s after %.1fs (%d in a row); starting "
                      "it again in %.1fs", self.name, process.pid, status, lasted, in_a_row,
                      backoff)
            if self._stopping.wait(backoff):
                return
            if not self._spawn():
                return
            self.restarts += 1
            backoff = min(backoff * 2, self._max)
