"""`ledger` as a real process: started with a deadline, always stopped, even when a test fails."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_ready(url: str, process: asyncio.subprocess.Process, seconds: float = 60) -> None:
    """Poll `url` until it answers 200 (the condition), or fail at the deadline or if the
    process exits first."""
    async with asyncio.timeout(seconds), aiohttp.ClientSession() as session:
        while True:
            if process.returncode is not None:
                raise AssertionError(f"ledger exited with {process.returncode} before ready")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


async def stop(process: asyncio.subprocess.Process) -> int:
    """SIGTERM, and SIGKILL the whole process group if it does not exit in time."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                if os.getpgid(process.pid) == process.pid:  # its own group: workers too
                    os.killpg(process.pid, signal.SIGKILL)
                else:
                    process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -1


@contextlib.asynccontextmanager
async def serving(
    env: dict[str, str], *args: str, port: int | None = None, cwd: Path | None = None,
    stderr: Path | None = None,
) -> AsyncIterator[str]:
    """`ledger serve` on a free port until the block ends; yields its base URL."""
    port = port or free_port()
    err = stderr.open("wb") if stderr is not None else None
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger", "serve", "--port", str(port), *args,
        env={**os.environ, **env}, cwd=cwd, stdout=asyncio.subprocess.DEVNULL,
        stderr=err or asyncio.subprocess.DEVNULL, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(f"{base}/readyz", process)
        yield base
    finally:
        await stop(process)
        if err is not None:
            err.close()
