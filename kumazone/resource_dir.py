"""The resources directory: every *.yaml, *.yml and *.json below it, polled.

A file is read again when its size, mtime or inode changes; a removed file takes
its resources with it.  A bad document is logged with its file and field and the
rest of the directory still loads; what the file defined before stays until it
is fixed.  A file caught mid-write (cut short so that it does not parse, or
read empty: an editor or a config tool truncates, then writes) keeps what it
defined: an unreadable file until it reads whole, an empty one for a scan (still
empty at the next scan with nothing changed, it is empty).  A directory missing
or unreadable is one warning, and everything it gave stays served until it is
back.  A scan costs O(files) to look, plus what changed.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kumazone.core.bulk import bulk_load
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
        #: Files read empty while they defined resources, at that signature.
        self._empty: dict[str, _Signature] = {}
        #: Why the directory cannot be scanned (warned once), or None.
        self._problem: str | None = None

    def _files(self) -> tuple[dict[str, _Signature], list[str]]:
        """Every resource file and its signature; and the directories that could not be read."""
        found: dict[str, _Signature] = {}
        failed: list[str] = []

        def unreadable(error: OSError) -> None:
            failed.append(error.filename if error.filename is not None else self.path)

        for directory, subdirectories, names in os.walk(self.path, onerror=unreadable):
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
        return found, failed

    def _directory_problem(self, failed: list[str]) -> str | None:
        """Why the directory itself cannot be scanned now, or None."""
        if not os.path.isdir(self.path):
            return "does not exist (or is not a directory)"
        if os.path.normpath(self.path) in [os.path.normpath(f) for f in failed]:
            return "cannot be read"
        return None

    def scan(self) -> int:
        """Load whatever changed since the last scan; returns how many files changed."""
        current, failed = self._files()
        problem = self._directory_problem(failed)
        if problem is not None:
            if self._problem != problem:
                self.log.warn(
                    "resources directory {path} {problem}: serving what it held until it is back",
                    path=self.path,
                    problem=problem,
                )
            self._problem = problem
            return 0
        if self._problem is not None:
            self._problem = None
            self.log.info("resources directory {path} is readable again", path=self.path)
        # Files below a directory that could not be listed are not gone.
        hidden = tuple(os.path.join(f, "") for f in failed)
        seen_before = dict(self._seen)
        changes: dict[str, list[Resource]] = {}
        for path in sorted(set(self._seen) - set(current)):
            if hidden and path.startswith(hidden):
                continue
            del self._seen[path]
            self._empty.pop(path, None)
            self.log.info("{path}: removed", path=self._relative(path))
            changes[path] = []
        changed = [
            (path, signature)
            for path, signature in sorted(current.items())
            if self._seen.get(path) != signature
        ]
        if not changed and not changes:
            return 0
        with bulk_load():  # a first scan loads the whole directory
            for path, signature in changed:
                resources = self._load(path, signature)
                if resources is not None:
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

    def _load(self, path: str, signature: _Signature) -> list[Resource] | None:
        """What file C{path} defines now; None to keep what it had (read it again later)."""
        before = self.zone.files.get(path, {})
        resources, clean, empty = self._read(path)
        if empty and before and self._empty.get(path) != signature:
            # Perhaps caught between a truncation and the write: look again next scan.
            self._empty[path] = signature
            self.log.info(
                "{path}: read empty; keeping its {count} resource(s) for now",
                path=self._relative(path),
                count=len(before),
            )
            return None
        self._empty.pop(path, None)
        self._seen[path] = signature
        if not clean:
            # Nothing already loaded is lost because of a bad edit (or a file
            # caught half written): what the file defined before stays until
            # the file reads whole and valid.
            fresh = {r.key for r in resources}
            kept = {key: resource for key, resource in before.items() if key not in fresh}
            if kept:
                self.log.warn(
                    "{path}: keeping {count} resource(s) loaded before until the file is fixed",
                    path=self._relative(path),
                    count=len(kept),
                )
            resources = [*resources, *kept.values()]
        return resources

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.path)

    def _read(self, path: str) -> tuple[list[Resource], bool, bool]:
        """The file's valid resources, whether every document was valid, and
        whether the file was empty."""
        name = self._relative(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            self.metrics.resources_rejected.labels("file").inc()
            self.log.warn("{path}: cannot be read ({error}); ignored", path=name, error=e)
            return [], False, False
        if not text.strip():
            return [], True, True
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
        return good, clean, False
