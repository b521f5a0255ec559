"""setup.cfg lists its packages by hand (see there why): every one of kumazone's must be
in it, or an installed kumazone (a wheel, the Docker lab's image) lacks it."""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_setup_cfg_lists_every_package() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    packages = {
        ".".join(path.parent.relative_to(REPO).parts)
        for path in (REPO / "kumazone").rglob("__init__.py")
    }
    assert packages - listed == set()
    assert "twisted.plugins" in listed
