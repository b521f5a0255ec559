"""The domain core imports no Twisted and nothing outside itself (STYLE.md, habit 1).

The modules are found by walking kumazone/core/, so a new core module is checked
the day it is added.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = sorted(
    "kumazone.core" + ("" if path.stem == "__init__" else "." + path.stem)
    for path in (ROOT / "kumazone" / "core").glob("*.py")
)
#: Outside the core but pure all the same: the SQLite store and the certificate maker.
ALSO_PURE = ["kumazone.store.sqlite", "kumazone.sync.certs"]

_CHILD = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def imported_by(*modules: str) -> list[str]:
    """The names in sys.modules of a fresh interpreter after importing C{modules}."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, *modules],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def twisted_modules(names: list[str]) -> list[str]:
    return [name for name in names if name.startswith("twisted")]


def kumazone_modules_outside_core(names: list[str]) -> list[str]:
    return [
        name
        for name in names
        if name.startswith("kumazone.") and not name.startswith("kumazone.core")
    ]


def test_the_walk_finds_the_core() -> None:
    assert {"kumazone.core.zone", "kumazone.core.vips", "kumazone.core.messages"} <= set(CORE)


def test_core_together_pulls_in_no_twisted() -> None:
    loaded = imported_by(*CORE)
    assert set(CORE) <= set(loaded)
    assert twisted_modules(loaded) == []


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_pulls_in_no_twisted_and_nothing_outside_core(module: str) -> None:
    loaded = imported_by(module)
    assert module in loaded
    assert twisted_modules(loaded) == []
    assert kumazone_modules_outside_core(loaded) == []


@pytest.mark.parametrize("module", ALSO_PURE)
def test_the_other_pure_modules_pull_in_no_twisted(module: str) -> None:
    loaded = imported_by(module)
    assert module in loaded
    assert twisted_modules(loaded) == []


def test_the_check_can_see_twisted() -> None:
    # The same child, asked to import Twisted, reports it: the check is not blind.
    assert "twisted.internet" in twisted_modules(imported_by("twisted.internet"))
