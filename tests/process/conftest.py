"""Fixtures the process tests share."""

from __future__ import annotations

import pytest

from tests.fedprocess import ProcessGroup


@pytest.fixture
def group(request: pytest.FixtureRequest) -> ProcessGroup:
    """Processes of one test, stopped at its end whatever happened."""
    made = ProcessGroup()
    request.addfinalizer(made.stop_all)
    return made
