"""Conformance of the zone's DNS as operators' tools judge it (issue 11).

DNSViz probes the zone as the authority for the domain, the server given explicitly
as address:port on loopback, and with C{mesh+} so that nothing above the domain (no
root, no parent) is ever queried; then C{dnsviz grok} must report no error and no
warning, EDNS compatibility checks (C{-E}) included.

Zonemaster (which speaks only port 53, and wants a parent to check the delegation
against) is not run yet: see the issue's closing note.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kzprocess import REPO, ZoneProcess


@pytest.fixture
def dnsviz() -> str:
    found = shutil.which("dnsviz")
    if found is None:
        if os.environ.get("KUMAZONE_LAB") == "skip":
            pytest.skip("KUMAZONE_LAB=skip: dnsviz is not installed")
        pytest.fail(
            "dnsviz is not installed (make test installs it; KUMAZONE_LAB=skip skips this)",
            pytrace=False,
        )
    return found


@pytest.fixture
def zone(tmp_path: Path) -> Iterator[ZoneProcess]:
    resources = tmp_path / "resources"
    shutil.copytree(REPO / "zones" / "zone-1", resources)
    process = ZoneProcess(tmp_path, resources)
    try:
        yield process.start()
    finally:
        process.stop()


def findings(node: Any, where: str = "") -> list[str]:
    """Every error and warning in a grok document, with where it was found."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("errors", "warnings"):
                found += [f"{where} {key}: {item.get('description', item)}" for item in value]
            else:
                found += findings(value, f"{where}/{key}")
    elif isinstance(node, list):
        for item in node:
            found += findings(item, where)
    return found


def test_dnsviz_reports_no_error_and_no_warning(dnsviz: str, zone: ZoneProcess, tmp_path) -> None:
    server = f"mesh+:ns.dns.mesh=127.0.0.1:{zone.ports['dns']}"
    probe = tmp_path / "probe.json"
    done = subprocess.run(
        [dnsviz, "probe", "-A", "-E", "-x", server, "-o", str(probe), "mesh"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(probe.read_text())
    assert document["mesh."]["explicit_delegation"] is True
    grok = subprocess.run(
        [dnsviz, "grok", "-l", "info", "-r", str(probe)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert grok.returncode == 0, grok.stderr
    analysis = json.loads(grok.stdout)
    assert analysis["mesh."]["status"] == "NOERROR"
    assert findings(analysis) == []
