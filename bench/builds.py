"""Which ledger an interpreter runs (pure Python or mypyc-compiled), and building the compiled one.

The benchmark runs `ledger serve` with another interpreter for the compiled build; what that
interpreter imports is checked, not assumed: `probe` lists the ledger modules that are
extension modules there, and refuses an interpreter that would import this source tree instead
of its own installation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the modules issue #15 names for compiling; the probe reports any ledger module that is compiled
CANDIDATES = ("wire", "redaction", "hashing", "envelope", "drafts", "trust", "models", "fold")
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "hatch_build.py", "build.py")

_PROBE = """
import importlib, json, pkgutil, sys
import ledger
found = {}
for info in pkgutil.walk_packages(ledger.__path__, "ledger."):
    if info.name.startswith("ledger.schema") or info.name.endswith("__main__"):
        continue
    try:
        module = importlib.import_module(info.name)
    except Exception as exc:
        found[info.name] = "unimportable: " + type(exc).__name__
        continue
    found[info.name] = getattr(module, "__file__", "") or ""
print(json.dumps({"location": ledger.__path__[0], "python": sys.version.split()[0],
                  "modules": found}))
"""


@dataclass(frozen=True)
class Build:
    """A ledger installation as one interpreter sees it."""

    python: str
    location: str
    compiled: tuple[str, ...]  # ledger modules that are extension modules

    @property
    def label(self) -> str:
        return f"compiled ({len(self.compiled)} modules)" if self.compiled else "pure"


def probe(python: str, *, outside: Path) -> Build:
    """Ask `python` (run from `outside`, with -P, so that it cannot import this tree by
    accident) where its ledger is and which of its modules are compiled."""
    completed = subprocess.run([python, "-P", "-c", _PROBE], cwd=outside, capture_output=True,
                               text=True, check=False, timeout=120)
    if completed.returncode != 0:
        raise SystemExit(f"{python} cannot import ledger: {completed.stderr.strip()[-400:]}")
    facts = json.loads(completed.stdout)
    broken = sorted(name for name, file in facts["modules"].items()
                    if file.startswith("unimportable"))
    if broken:
        raise SystemExit(f"{python} cannot import {', '.join(broken)}: is its venv complete?")
    compiled = tuple(sorted(name for name, file in facts["modules"].items()
                            if file.endswith((".so", ".pyd"))))
    return Build(python=python, location=facts["location"], compiled=compiled)


def switch_exists(variable: str) -> bool:
    """Whether this tree's build configuration reads `variable` at all."""
    return any(variable in (REPO / name).read_text(errors="replace")
               for name in _BUILD_FILES if (REPO / name).is_file())


def build_compiled(venv: Path, *, variable: str = "LEDGER_MYPYC") -> str | None:
    """A fresh venv at `venv` with this tree installed as `variable=1 pip install .` builds it.
    Returns its interpreter, or None (with the reason printed) when the tree has no such
    switch yet. The source is copied first (without .venv, .git and bench/out) so that the
    build leaves nothing behind in the worktree. Only ledger is installed there: its
    dependencies are this interpreter's (a .pth file), so both builds run the same versions of
    aiohttp, asyncpg and the rest, and nothing is downloaded but the build's own requirements."""
    if not switch_exists(variable):
        print(f"compiled build skipped: this tree's build configuration "
              f"({', '.join(_BUILD_FILES)}) does not read {variable} yet, so "
              f"`{variable}=1 pip install .` would install the pure build", file=sys.stderr)
        return None
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    # a path line, not a site directory: the .pth files there (this tree's editable install)
    # are not run, so the venv's own ledger is the one imported
    (Path(purelib) / "ledger-bench-deps.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    ignore = shutil.ignore_patterns(".venv", ".git", "out", ".ledger", "__pycache__", "build",
                                    "*.egg-info", ".mypy_cache", ".ruff_cache", ".pytest_cache",
                                    ".hypothesis", "*.so")
    with tempfile.TemporaryDirectory(prefix="ledger-compiled-") as scratch:
        source = Path(scratch) / "src"
        shutil.copytree(REPO, source, ignore=ignore)
        print(f"building the compiled ledger into {venv} ({variable}=1 pip install .) …",
              file=sys.stderr)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(source)],
                       env={**os.environ, variable: "1"}, check=True)
    return python
