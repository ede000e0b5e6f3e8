"""The optional compiled build: pure Python unless `LEDGER_MYPYC=1` (the switch mypy's own
setup.py has as `MYPY_USE_MYPYC`).

`pip install .` and `pip wheel .` build a pure-Python package that needs no compiler: this file
then adds nothing to pyproject.toml. With `LEDGER_MYPYC=1`, the pure modules listed in
pyproject.toml `[tool.ledger.mypyc]` are compiled by mypyc into extension modules that import in
place of their sources (which stay in the wheel). The build backend in `_build/` asks for mypy
and the runtime dependencies its type check needs, so an isolated build works as it is.
Optional knobs, as mypy and Black name them: `MYPYC_OPT_LEVEL` (default 3), `MYPYC_DEBUG_LEVEL`
(default 1).
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """The modules the compiled build compiles: pyproject.toml is the one list."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        return list(tomllib.load(file)["tool"]["ledger"]["mypyc"]["modules"])


def ext_modules() -> list[Extension]:
    if os.environ.get("LEDGER_MYPYC", "0") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("LEDGER_MYPYC=1 needs mypy (it carries mypyc) where the build runs: "
                 "pip install mypy, or build without --no-build-isolation")
    os.chdir(ROOT)  # the paths below, and mypy's configuration (pyproject.toml), are relative
    paths = [name.replace(".", "/") + ".py" for name in compiled_modules()]
    return mypycify(
        paths,
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
        debug_level=os.environ.get("MYPYC_DEBUG_LEVEL", "1"),
        # the runtime they share, inside the package (ledger/_compiled__mypyc.*.so) so that it
        # imports wherever `ledger` does, an in-place build included
        group_name="ledger._compiled",
    )


setup(ext_modules=ext_modules())
