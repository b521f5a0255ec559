"""The domain core imports no Twisted (STYLE.md, habit 1)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CORE = [
    "kumazone.names",
    "kumazone.vips",
    "kumazone.resources",
    "kumazone.config",
    "kumazone.store",
    "kumazone.zone",
    "kumazone.ratelimit",
    "kumazone.sync",
    "kumazone.federation",
    "kumazone.certs",
]

ROOT = Path(__file__).resolve().parent.parent

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


def test_core_together_pulls_in_no_twisted() -> None:
    loaded = imported_by(*CORE)
    assert set(CORE) <= set(loaded)
    assert twisted_modules(loaded) == []


@pytest.mark.parametrize("module", CORE)
def test_each_core_module_pulls_in_no_twisted(module: str) -> None:
    loaded = imported_by(module)
    assert module in loaded
    assert twisted_modules(loaded) == []


def test_the_check_can_see_twisted() -> None:
    # The same child, asked to import Twisted, reports it: the check is not blind.
    assert "twisted.internet" in twisted_modules(imported_by("twisted.internet"))
