"""Run `ledger` with a timeline of what its process did, for bench.latency's attribution.

    python -P bench/trace.py OUT.jsonl serve --port 8080

Records, with `time.perf_counter` (CLOCK_MONOTONIC: one clock for every process of the machine,
so the generator's due times line up): every garbage collection (generation, wall, CPU); every
event-loop callback over 0.2 ms (wall, the thread's CPU in it — wall far above CPU means the
process was runnable but not running: the other core's work, or its own syscalls — and which
task it stepped, where it stopped); every asyncpg statement (wall, its first words); every
commit of the group committer (wall, drafts); every intake request (wall in the handler).
Written as JSON lines when `ledger` returns.

Standalone on purpose (imports only the stdlib, asyncpg and ledger): it runs against a
baseline tree as well (`PYTHONPATH=baseline`), whose bench/ has no such module.
Environment: BENCH_TRACE_LOOP=asyncio (default: only asyncio's loop can time each callback;
`uvloop` keeps the production loop and times everything but callbacks).
"""

from __future__ import annotations

import asyncio
import asyncio.events
import functools
import gc
import json
import os
import sys
import time
from typing import Any

_pc, _cpu = time.perf_counter, time.thread_time
_events: list[tuple[Any, ...]] = []
_CALLBACK_MS = 0.2


def _gc_callback(phase: str, info: dict[str, int], _open: list[tuple[float, float]] = []) -> None:  # noqa: B006
    if phase == "start":
        _open[:] = [(_pc(), _cpu())]
    elif _open:
        start, cpu = _open.pop()
        _events.append(("gc", start, _pc(), _cpu() - cpu, info["generation"], info["collected"]))


_CENSUS = os.environ.get("BENCH_TRACE_GC_CENSUS") == "1"


def _censuses() -> None:
    """Twice a second, from a thread (not from the collector's callback: get_objects there
    crashed the interpreter), `_census` of generations 0 and 1."""
    while True:
        time.sleep(0.5)
        for generation in (0, 1):
            _census(generation)


def _census(generation: int) -> None:
    """What a young collection looks at (BENCH_TRACE_GC_CENSUS=1): how many objects the
    generation holds, and the largest containers among them — a collection's cost is the
    references it follows, and one large young container is most of them."""
    began = _pc()
    objects = gc.get_objects(generation=generation)
    sized = []
    for o in objects:
        try:
            sized.append((len(o), type(o).__qualname__, _owner(o)))
        except TypeError:
            continue
    sized.sort(key=lambda s: -s[0])
    _events.append(("census", began, _pc(), generation, len(objects), sized[:5]))


def _owner(o: Any) -> str:
    """A hint of whose a container is: the type of a value or key in it."""
    if isinstance(o, dict) and o:
        key, value = next(iter(o.items()))
        return f"{type(key).__qualname__}->{type(value).__qualname__} {str(key)[:40]}"
    if isinstance(o, (list, tuple, set, frozenset)) and o:
        return type(next(iter(o))).__qualname__
    return ""


def _where(handle: asyncio.Handle) -> str:
    """The task a slow callback stepped, and the innermost coroutine it is suspended in now."""
    callback = handle._callback  # type: ignore[attr-defined]
    task = getattr(callback, "__self__", None)
    if not isinstance(task, asyncio.Task):
        return getattr(callback, "__qualname__", repr(callback))[:80]
    coro: Any = task.get_coro()
    names = [getattr(coro, "__qualname__", "?")]
    while coro is not None:
        inner = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if inner is None or not hasattr(inner, "__qualname__"):
            break
        coro = inner
        names.append(coro.__qualname__)
    return " > ".join([names[0], *names[-2:]] if len(names) > 3 else names)[:160]


def _patch_loop() -> None:
    run = asyncio.events.Handle._run

    def timed(self: asyncio.Handle) -> None:
        start, cpu = _pc(), _cpu()
        run(self)
        end = _pc()
        if end - start > _CALLBACK_MS / 1000:
            _events.append(("cb", start, end, _cpu() - cpu, _where(self)))

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


def _patch_asyncpg() -> None:
    from asyncpg import connection

    for name in ("execute", "fetch", "fetchrow", "fetchval"):
        original = getattr(connection.Connection, name)

        async def timed(self: Any, query: str, *args: Any, _original: Any = original,
                        **kwargs: Any) -> Any:
            start = _pc()
            try:
                return await _original(self, query, *args, **kwargs)
            finally:
                _events.append(("sql", start, _pc(), " ".join(query.split()[:4])[:48]))

        setattr(connection.Connection, name, functools.wraps(original)(timed))


def _patch_ledger() -> None:
    from ledger import committer, web

    commit = committer.GroupCommitter._commit

    async def timed_commit(self: Any, batch: list[Any]) -> None:
        start = _pc()
        try:
            await commit(self, batch)
        finally:
            _events.append(("commit", start, _pc(), len(batch)))

    committer.GroupCommitter._commit = timed_commit  # type: ignore[method-assign]
    receive = web.receive_event

    async def timed_receive(request: Any) -> Any:
        start = _pc()
        try:
            return await receive(request)
        finally:
            _events.append(("req", start, _pc()))

    web.receive_event = timed_receive


def _dump(path: str) -> None:
    with open(path, "w") as out:
        for event in _events:
            out.write(json.dumps(event) + "\n")


def main() -> None:
    path, args = sys.argv[1], sys.argv[2:]
    if os.environ.get("BENCH_TRACE_LOOP", "asyncio") == "asyncio":
        sys.modules["uvloop"] = None  # type: ignore[assignment]  # import fails: asyncio's loop
        _patch_loop()
    gc.callbacks.append(_gc_callback)
    if _CENSUS:
        import threading
        threading.Thread(target=_censuses, daemon=True).start()
    _patch_asyncpg()
    _patch_ledger()
    from ledger.cli import main as ledger

    sys.argv = ["ledger", *args]
    try:
        ledger()
    finally:
        _dump(path)


if __name__ == "__main__":
    main()
