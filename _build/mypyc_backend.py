"""setuptools' build backend, asking for mypy when the compiled build is switched on.

The documented way to make build requirements dynamic (setuptools, "Dynamic build dependencies
and other build_meta tweaks"): a plain build needs setuptools only; `LEDGER_MYPYC=1` adds mypy
(mypyc) and the project's runtime dependencies, which mypy needs to type-check what it compiles
(hatch-mypyc's `require-runtime-dependencies`). See setup.py.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  # every hook not redefined here


def _mypyc_requirements() -> list[str]:
    if os.environ.get("LEDGER_MYPYC", "0") != "1":
        return []
    with (Path.cwd() / "pyproject.toml").open("rb") as file:
        config = tomllib.load(file)
    return [*config["tool"]["ledger"]["mypyc"]["build-requires"],
            *config["project"]["dependencies"]]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    extra = _mypyc_requirements()
    switch = os.environ.pop("LEDGER_MYPYC", None)  # setuptools runs setup.py to ask: mypy is
    try:  # not installed yet, so it answers as the pure build would
        return [*_setuptools.get_requires_for_build_wheel(config_settings), *extra]
    finally:
        if switch is not None:
            os.environ["LEDGER_MYPYC"] = switch
