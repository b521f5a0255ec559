"""Run a real `twistd -n kumazone` process on free ports and talk to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

import dns.flags
import dns.message
import dns.query
import dns.rdatatype

REPO = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")


class ControlPlaneProcess:
    """What every kumazone child process offers: its log, stopping it, its HTTP ports."""

    process: subprocess.Popen[bytes] | None
    log_path: Path
    ports: dict[str, int]
    workdir: Path
    data_dir: Path

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0, until: str = "/ready") -> Self:
        """Start and wait until C{until} (on the diagnostics port) answers 200."""
        ports_file = self.data_dir / "ports.json"
        if ports_file.exists():
            ports_file.unlink()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("KUMA_")}
        environment.update(getattr(self, "env", {}))
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(
                    f"kumazone exited with {self.process.returncode}:\n{output}\n{self.log()}"
                )
            if ports_file.exists():
                self.ports = json.loads(ports_file.read_text())
                try:
                    if self.http("diagnostics", "GET", until)[0] == 200:
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"kumazone did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    # -- clients ------------------------------------------------------------------

    def http(
        self,
        server: str,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports[server]}{path}",
            data=body,
            method=method,
            headers={"Content-Type": content_type},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def api(
        self,
        method: str,
        path: str,
        document: Any = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        body = (
            raw
            if raw is not None
            else (json.dumps(document).encode() if document is not None else None)
        )
        status, data = self.http("api", method, path, body, content_type)
        return status, json.loads(data) if data.strip() else None

    def vips(self) -> dict[str, Any]:
        """The whole table: every page of GET /vips, read again if it changed meanwhile."""
        for _attempt in range(5):
            status, first = self.api("GET", "/vips?size=1000")
            assert status == 200, first
            items, page = list(first["items"]), first
            while page["next"] is not None and page["version"] == first["version"]:
                url = urllib.parse.urlsplit(page["next"])
                status, page = self.api("GET", f"{url.path}?{url.query}")
                assert status == 200, page
                items += page["items"]
            if page["version"] == first["version"]:
                return {**first, "items": items, "next": None}
        raise AssertionError("GET /vips: the table changed while it was read, five times")


class ZoneProcess(ControlPlaneProcess):
    """A standalone zone control plane in a child process."""

    def __init__(
        self,
        workdir: Path,
        resources: Path | None = None,
        zone: str = "zone-1",
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.resources = resources
        self.zone = zone
        self.args = list(args)
        self.env = env or {}
        self.data_dir = data_dir or workdir / "data"
        self.log_path = workdir / f"{zone}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def command(self) -> list[str]:
        command = [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile=" + str(self.log_path),
            "kumazone",
            "--role=zone",
            f"--zone={self.zone}",
            "--dns-port=0",
            "--api-port=0",
            "--diagnostics-port=0",
            # With TLS files a zone serves dataplanes too: never on the one 5678.
            "--dp-port=0",
            "--dns-interface=127.0.0.1",
            f"--data-dir={self.data_dir}",
        ]
        if self.resources is not None:
            command.append(f"--resources={self.resources}")
        return command + self.args

    def query(
        self,
        name: str,
        rdtype: str = "A",
        tcp: bool = False,
        source: str | None = None,
        use_edns: int | bool = -1,
        payload: int = 1232,
        timeout: float = 5.0,
    ) -> dns.message.Message:
        """One query with dnspython, over UDP (default) or TCP."""
        message = dns.message.make_query(
            name, dns.rdatatype.from_text(rdtype), use_edns=use_edns, payload=payload
        )
        message.flags &= ~dns.flags.RD
        send = dns.query.tcp if tcp else dns.query.udp
        kwargs: dict[str, Any] = {"timeout": timeout, "port": self.ports["dns"]}
        if source is not None:
            kwargs["source"] = source
        return send(message, "127.0.0.1", **kwargs)

    def dig(self, *args: str, tool: str = "dig") -> str:
        """Run dig (or kdig) against the zone and return its output."""
        binary = shutil.which(tool)
        assert binary is not None, f"{tool} is not installed (make test installs it)"
        result = subprocess.run(
            [binary, "@127.0.0.1", "-p", str(self.ports["dns"]), *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return result.stdout + result.stderr


@contextmanager
def sample_zone(workdir: Path, **kwargs: Any) -> Iterator[ZoneProcess]:
    """A zone serving a copy of zones/zone-1 from C{workdir}, stopped on exit."""
    resources = workdir / "resources"
    shutil.copytree(REPO / "zones" / "zone-1", resources)
    process = ZoneProcess(workdir, resources, **kwargs)
    try:
        yield process.start()
    finally:
        process.stop()
