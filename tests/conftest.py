"""Shared fixtures: real kumazone processes on free ports."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kzprocess import REPO, ZoneProcess


@pytest.fixture
def zone_process(tmp_path: Path) -> Iterator[Callable[..., ZoneProcess]]:
    """Factory: start a zone (resources copied from zones/zone-1 unless told)."""
    started: list[ZoneProcess] = []

    def start(resources: Path | str | None = "zone-1", **kwargs: Any) -> ZoneProcess:
        if isinstance(resources, str):
            copy = tmp_path / f"resources-{resources}"
            if not copy.exists():
                shutil.copytree(REPO / "zones" / resources, copy)
            resources = copy
        process = ZoneProcess(tmp_path, resources, **kwargs)
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server of the session's own (initdb in a temporary directory)."""
    from tests.pgserver import PostgresServer, find_binaries

    binaries = find_binaries()
    if binaries is None:
        pytest.fail("PostgreSQL is not installed: `make test` installs Debian's postgresql")
    server = PostgresServer(binaries).start()
    yield server
    server.remove()
