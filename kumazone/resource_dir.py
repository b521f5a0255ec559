"""The resources directory: every *.yaml, *.yml and *.json below it, polled.

A file is read again when its size, mtime or inode changes; a removed file takes
its resources with it.  A bad document is logged with its file and field and the
rest of the directory still loads.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kumazone.core.resources import Resource, ResourceError, parse_documents
from kumazone.core.zone import Zone
from kumazone.metrics import Metrics

__all__ = ["RESOURCE_SUFFIXES", "ResourceDirectory"]

RESOURCE_SUFFIXES = (".yaml", ".yml", ".json")
_Signature = tuple[int, int, int]


class ResourceDirectory:
    """Keeps a L{Zone} in step with the files of one directory."""

    log = Logger()

    def __init__(self, path: str, zone: Zone, metrics: Metrics, clock: IReactorTime) -> None:
        self.path = path
        self.zone = zone
        self.metrics = metrics
        self.clock = clock
        self._seen: dict[str, _Signature] = {}

    def _files(self) -> dict[str, _Signature]:
        found: dict[str, _Signature] = {}
        for directory, subdirectories, names in os.walk(self.path):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for name in names:
                if name.startswith(".") or not name.endswith(RESOURCE_SUFFIXES):
                    continue
                full = os.path.join(directory, name)
                try:
                    info = os.stat(full)
                except OSError:
                    continue
                found[full] = (info.st_size, info.st_mtime_ns, info.st_ino)
        return found

    def scan(self) -> int:
        """Load whatever changed since the last scan; returns how many files changed."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"resources directory {self.path} does not exist")
        current = self._files()
        seen_before = dict(self._seen)
        changes: dict[str, list[Resource]] = {}
        for path in sorted(set(self._seen) - set(current)):
            del self._seen[path]
            self.log.info("{path}: removed", path=self._relative(path))
            changes[path] = []
        for path, signature in sorted(current.items()):
            if self._seen.get(path) == signature:
                continue
            self._seen[path] = signature
            resources, clean = self._read(path)
            if not clean:
                # Nothing already loaded is lost because of a bad edit: what the
                # file defined before stays until the file is fixed.
                fresh = {r.key for r in resources}
                kept = {
                    key: resource
                    for key, resource in self.zone.files.get(path, {}).items()
                    if key not in fresh
                }
                if kept:
                    self.log.warn(
                        "{path}: keeping {count} resource(s) loaded before until the file is fixed",
                        path=self._relative(path),
                        count=len(kept),
                    )
                resources = [*resources, *kept.values()]
            changes[path] = resources
        if changes:
            # One reconciliation for the whole scan: at start-up every file is
            # loaded before any VIP is allocated or released.
            try:
                self.zone.set_files(changes, self.clock.seconds())
            except Exception:
                self._seen = seen_before  # the next scan tries these files again
                raise
        return len(changes)

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.path)

    def _read(self, path: str) -> tuple[list[Resource], bool]:
        """The file's valid resources, and whether every document was valid."""
        name = self._relative(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            self.metrics.resources_rejected.labels("file").inc()
            self.log.warn("{path}: cannot be read ({error}); ignored", path=name, error=e)
            return [], False
        good: list[Resource] = []
        clean = True
        for index, result in enumerate(parse_documents(text, json_only=path.endswith(".json"))):
            if isinstance(result, ResourceError):
                clean = False
                self.metrics.resources_rejected.labels("file").inc()
                self.log.warn(
                    "{path}: document {index} refused: {error}",
                    path=name,
                    index=index + 1,
                    error=str(result),
                )
            else:
                good.append(result)
        self.log.info("{path}: {count} resource(s) loaded", path=name, count=len(good))
        return good, clean
