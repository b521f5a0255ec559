"""The resources directory, over real files in a temporary directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from kumazone.core.config import DnsServerConfig
from kumazone.core.vips import ServiceKey
from kumazone.core.zone import Zone
from kumazone.metrics import Metrics
from kumazone.resource_dir import ResourceDirectory
from kumazone.store.sqlite import SQLiteStore
from tests.builders import as_yaml, dataplane


class Watched:
    """A zone following a directory, and what the directory logged."""

    def __init__(self, tmp: Path) -> None:
        self.root = tmp / "resources"
        self.root.mkdir()
        self.zone = Zone("zone-1", DnsServerConfig(), SQLiteStore(str(tmp / "zone.sqlite")))
        self.events: list[dict[str, Any]] = []
        self.directory = ResourceDirectory(str(self.root), self.zone, Metrics("zone-1"), Clock())
        self.directory.log = Logger(observer=self.events.append)

    def services(self) -> set[str]:
        return {key.service for key in self.zone.wanted()}

    def warnings(self, *words: str) -> list[str]:
        lines = [formatEvent(e) for e in self.events if e["log_level"].name == "warn"]
        return [line for line in lines if all(w in line for w in words)]


def test_a_file_read_empty_keeps_its_services_for_a_scan(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    path = watched.root / "web.yaml"
    path.write_text(as_yaml(dataplane("web-1", "web"), dataplane("db-1", "db")))
    watched.directory.scan()
    assert watched.services() == {"web", "db"}
    path.write_text("")  # an editor truncates before it writes
    watched.directory.scan()
    assert watched.services() == {"web", "db"}
    path.write_text(as_yaml(dataplane("web-1", "web")))
    watched.directory.scan()
    assert watched.services() == {"web"}


def test_a_file_still_empty_at_the_next_scan_is_empty(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    path = watched.root / "web.yaml"
    path.write_text(as_yaml(dataplane("web-1", "web")))
    watched.directory.scan()
    path.write_text("")
    watched.directory.scan()
    assert watched.services() == {"web"}
    watched.directory.scan()
    assert watched.services() == set()


def test_a_file_cut_short_keeps_what_it_defined_until_it_reads_whole(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    path = watched.root / "list.json"
    whole = (
        "["
        + ",".join(json.dumps(dataplane(f"dp-{i}", f"s{i}", address="192.0.2.1")) for i in range(3))
    ) + "]"
    path.write_text(whole)
    watched.directory.scan()
    assert watched.services() == {"s0", "s1", "s2"}
    vips = {e.key: e.vip for e in watched.zone.snapshot.entries}
    path.write_text(whole[: len(whole) // 2])  # caught half written
    watched.directory.scan()
    assert watched.services() == {"s0", "s1", "s2"}
    yaml_path = watched.root / "more.yaml"
    text = as_yaml(dataplane("m-1", "more"))
    yaml_path.write_text(text)
    watched.directory.scan()
    yaml_path.write_text(text[: text.index("inbound")] + "inbound: [")
    watched.directory.scan()
    assert "more" in watched.services()
    path.write_text(whole)
    watched.directory.scan()
    assert {e.key: e.vip for e in watched.zone.snapshot.entries if e.key.service != "more"} == vips


def test_a_file_renamed_into_place_changes_only_what_differs(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    path = watched.root / "web.yaml"
    path.write_text(as_yaml(dataplane("web-1", "web")))
    watched.directory.scan()
    changes: list[object] = []
    watched.zone.listeners.append(changes.append)
    staged = watched.root / ".web.yaml.tmp"
    staged.write_text(as_yaml(dataplane("web-1", "web")))  # same content, new inode
    watched.directory.scan()  # a hidden file is not read
    os.replace(staged, path)
    watched.directory.scan()
    assert watched.services() == {"web"} and changes == []


def test_a_missing_directory_is_one_warning_and_keeps_serving(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    (watched.root / "web.yaml").write_text(as_yaml(dataplane("web-1", "web")))
    watched.directory.scan()
    moved = tmp_path / "elsewhere"
    watched.root.rename(moved)
    for _ in range(3):
        assert watched.directory.scan() == 0
    assert len(watched.warnings("does not exist")) == 1
    assert watched.services() == {"web"}
    moved.rename(watched.root)
    watched.directory.scan()
    assert watched.services() == {"web"}
    watched.root.rename(moved)
    watched.directory.scan()
    assert len(watched.warnings("does not exist")) == 2  # gone again: said again


def test_thousands_of_files_change_one_at_a_time(tmp_path: Path) -> None:
    watched = Watched(tmp_path)
    for i in range(300):
        (watched.root / f"f{i}.yaml").write_text(as_yaml(dataplane(f"dp-{i}", f"s{i}")))
    assert watched.directory.scan() == 300
    changes: list[Any] = []
    watched.zone.listeners.append(changes.append)
    (watched.root / "f7.yaml").write_text(as_yaml(dataplane("dp-7", "seven")))
    assert watched.directory.scan() == 1
    (change,) = changes
    assert change.services_added == {ServiceKey("default", "seven")}
    assert change.services_removed == {ServiceKey("default", "s7")}
