"""Pure Python vs the compiled build (mypyc): CPU per draft and per folded event.

    python -m bench.compiled [--deliveries 5000] [--rounds 5] [--modules a,b,…] [--record]

Copies the checkout twice into a temporary directory and builds the compiled modules in one copy
(`LEDGER_MYPYC=1 setup.py build_ext --inplace`: the list in pyproject.toml, or `--modules`), then
measures both copies in child processes on the same simulated corpus (`ledger.simulation`),
alternating which copy goes first in every round. Each child times CPU (`time.process_time`)
in-process: the whole draft of a delivery (decode, scrub, envelope, draft: `IntakeService.draft`)
and `fold.apply` per stored event (from its stored fold record, as a rebuild folds), the best of
a few passes. The table shows the medians and the
ratios of the medians; on a shared machine the ratios are the result, not the microseconds.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "*.egg-info", "__pycache__", ".*_cache", ".ledger", "build", "dist", "out",
    "*.so", ".hypothesis",
)


def listed_modules() -> list[str]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return list(tomllib.load(file)["tool"]["ledger"]["mypyc"]["modules"])


def measure(count: int, passes: int) -> dict[str, Any]:
    """In a child process whose working directory is one copy: what one draft and one folded
    event cost in CPU, and which of the listed modules are compiled here."""
    import orjson

    from ledger import foldrecord, wire
    from ledger.envelope import INSTALL, UNINSTALL, UPDATE
    from ledger.intake import Delivery, IntakeService
    from ledger.projections import fold
    from ledger.settings import Settings
    from ledger.simulation import Traffic

    compiled = [name for name in listed_modules()
                if str(importlib.import_module(name).__file__).endswith(".so")]
    settings = Settings(database_url="postgresql://bench@127.0.0.1/unused")
    intake = IntakeService(settings, committer=None)  # type: ignore[arg-type]  # drafts only
    traffic = Traffic(seed=7, portals=50, churn=False)
    deliveries: list[Delivery] = []
    while len(deliveries) < count:
        simulated = traffic.next()
        if simulated.document["event"] not in (INSTALL, UNINSTALL, UPDATE):
            body = wire.http_build_query(simulated.document)
            deliveries.append(Delivery(body, wire.FORM, simulated.query, "127.0.0.1"))
    received = datetime.now(UTC)
    drafts = [intake.draft(d, received) for d in deliveries]  # also warms every cache
    draft_best = float("inf")
    for _ in range(passes):
        began = time.process_time()
        for delivery in deliveries:
            intake.draft(delivery, received)
        draft_best = min(draft_best, time.process_time() - began)
    events = [
        fold.StoredEvent(
            position=position, member_id=d.member_id, event_type=d.event_type, origin=d.origin,
            bot_ids=d.bot_ids, occurred_at=d.occurred_at, received_at=d.received_at,
            payload=orjson.loads(d.payload), hash=d.payload_sha256,
            record=foldrecord.decode(d.fold_record) if d.fold_record is not None else None,
        )
        for position, d in enumerate(drafts, 1)
    ]
    fold_best = float("inf")
    for _ in range(passes * 2):
        state = fold.State()
        began = time.process_time()
        for event in events:
            fold.apply(state, event)
        fold_best = min(fold_best, time.process_time() - began)
    return {"compiled": compiled, "draft_us": draft_best / count * 1e6,
            "fold_us": fold_best / count * 1e6}


def _copy(target: Path) -> Path:
    shutil.copytree(ROOT, target, ignore=_COPY_IGNORE)
    return target


def build(tree: Path, modules: list[str] | None) -> float:
    """The compiled modules, in place in `tree`; returns the build's wall seconds."""
    if modules is not None:  # an experiment: compile another list than pyproject.toml's
        pyproject = tree / "pyproject.toml"
        with pyproject.open("rb") as file:
            listed = tomllib.load(file)["tool"]["ledger"]["mypyc"]["modules"]
        text = pyproject.read_text()
        old = "modules = [" + text.split("modules = [", 1)[1].split("]", 1)[0] + "]"
        assert all(f'"{name}"' in old for name in listed)
        pyproject.write_text(text.replace(old, "modules = " + json.dumps(modules), 1))
    began = time.monotonic()
    subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"],
                   cwd=tree, env={**os.environ, "LEDGER_MYPYC": "1"}, check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - began


def child(tree: Path, count: int, passes: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.compiled", "--measure", str(count), "--passes", str(passes)],
        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True,
        text=True,
    )
    return dict(json.loads(out.stdout))


def run(count: int, rounds: int, passes: int, modules: list[str] | None, record: bool) -> None:
    expected = modules if modules is not None else listed_modules()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-compiled-") as temp:
        pure = _copy(Path(temp) / "pure")
        compiled = _copy(Path(temp) / "compiled")
        seconds = build(compiled, modules)
        results: dict[str, list[dict[str, Any]]] = {"pure": [], "compiled": []}
        for index in range(rounds):
            order = [("pure", pure), ("compiled", compiled)]
            for name, tree in order if index % 2 == 0 else reversed(order):
                results[name].append(child(tree, count, passes))
    if results["pure"][0]["compiled"] or sorted(results["compiled"][0]["compiled"]) \
            != sorted(expected):
        raise SystemExit(f"not the builds asked for: {results['pure'][0]['compiled']} / "
                         f"{results['compiled'][0]['compiled']}")
    lines = [
        f"`python -m bench.compiled --deliveries {count} --rounds {rounds}`: {count} simulated "
        f"deliveries (seed 7, 50 portals), CPU time in-process, best of {passes} passes per "
        f"child, {rounds} rounds alternating which build goes first; median of the rounds. "
        f"Compiled ({seconds:.0f} s to build): {', '.join(expected)}.",
        "",
        "| measure | pure µs | compiled µs | compiled / pure | per-round ratios |",
        "|---|---:|---:|---:|---|",
    ]
    for key, label in (("draft_us", "draft (decode, scrub, envelope, draft)"),
                       ("fold_us", "fold.apply, per event")):
        pure_us = statistics.median(r[key] for r in results["pure"])
        compiled_us = statistics.median(r[key] for r in results["compiled"])
        each = ", ".join(f"{c[key] / p[key]:.2f}"
                         for p, c in zip(results["pure"], results["compiled"], strict=True))
        lines.append(f"| {label} | {pure_us:.1f} | {compiled_us:.1f} | "
                     f"**{compiled_us / pure_us:.2f}x** | {each} |")
    if record:
        from bench.common import record as append

        append("Compiled build (mypyc) vs pure Python", lines)
    else:
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--modules", default=None,
                        help="comma-separated modules to compile instead of pyproject.toml's")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--measure", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.passes)))
        return
    modules = args.modules.split(",") if args.modules else None
    run(args.deliveries, args.rounds, args.passes, modules, args.record)


if __name__ == "__main__":
    main()
