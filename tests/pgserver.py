"""A real PostgreSQL server for tests: initdb in a temporary directory, a free port, stopped after.

The server runs as an unprivileged user (C{nobody} when the tests run as root,
as CI does: PostgreSQL refuses to run as root), listens on 127.0.0.1 and a
Unix socket in its own directory only, trusts local connections, and is
stopped (fast shutdown) and removed when the test session ends.  Debian's
C{postgresql} package provides the binaries (C{make test} installs it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PostgresServer", "find_binaries"]

#: Debian's layout: /usr/lib/postgresql/VERSION/bin.
_DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"


def find_binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres (the newest version), or None."""
    found = sorted(glob.glob(_DEBIAN_BINARIES), key=lambda p: int(Path(p).parent.name))
    for directory in reversed(found):
        if (Path(directory) / "initdb").exists():
            return Path(directory)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One PostgreSQL server of the tests' own; C{dsn} (no password) reaches its C{kumazone} db."""

    USER = "kumazone"
    DATABASE = "kumazone"

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="kumazone-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.port = _free_port()
        self.log = self.root / "server.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses root: the server (and its files) belong to nobody.
            nobody = pwd.getpwnam("nobody")
            self.sockets.mkdir()
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            os.chown(self.sockets, nobody.pw_uid, nobody.pw_gid)
            self._as = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
            self._as += ["--clear-groups", "--"]
        else:
            self.sockets.mkdir()

    @property
    def dsn(self) -> str:
        """The store URL a kumazone process is given: C{postgresql://USER@HOST:PORT/DB}."""
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{self.DATABASE}"

    def _run(self, *argv: str, timeout: float = 60) -> None:
        subprocess.run(
            [*self._as, *argv],
            check=True,
            timeout=timeout,
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self) -> PostgresServer:
        """initdb (once) and start; returns when the server takes connections."""
        if not self.data.exists():
            self._run(
                str(self.binaries / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.sockets}'\n"
                    "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                    "max_connections = 200\nshared_buffers = 32MB\n"
                    # When each transaction committed: tests order writes by it.
                    "track_commit_timestamp = on\n"
                )
        self._run(
            str(self.binaries / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "start",
        )
        self._wait_ready()
        self._create_database()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = subprocess.run(
                [
                    str(self.binaries / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    self.USER,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL did not start; see {self.log}")

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.USER, dbname="postgres", autocommit=True
        ) as conn:
            if not conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.DATABASE,)
            ).fetchone():
                conn.execute(f'CREATE DATABASE "{self.DATABASE}"')

    def fresh_database(self, name: str) -> str:
        """A new empty database on this server; its store URL."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=self.USER, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{name}"

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (its files stay, for a start again)."""
        if not (self.data / "postmaster.pid").exists():
            return
        self._run(str(self.binaries / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        """Stop, and remove every file of the server."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
