"""kumazone install dns, proven with real forwarders: unbound (DNSSEC validation on,
Debian's root trust anchor) and dnsmasq, each configured with nothing but the drop-in
the command prints plus its own minimal settings, in front of a running zone.

Everything runs inside one network namespace that the test makes and removes: its
only interface is lo, so the forwarders reach the zone on 127.0.0.1 (the drop-ins are
made with --cp-address 127.0.0.1) and no packet can leave it (unbound, validating,
cannot even try to reach the root servers).  Needs root, like tests/lab/test_lab.py:
without namespaces the test fails and says why (KUMAZONE_LAB=skip skips it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kzprocess import REPO, ZoneProcess
from tests.lab.test_lab import namespaces_unavailable

BIN = Path(sys.executable).parent
LABCTL = REPO / "lab" / "labctl.py"
ROOT_KEY = Path("/usr/share/dns/root.key")
ZONE_DNS_PORT = 5653
DNSMASQ_PORT = 53
UNBOUND_PORT = 54
DOTTED = ("echo-server_echo-example_svc_1010", "echo-server.echo-example.svc.1010.mesh")


def find(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (str(p) for p in (Path("/usr/sbin") / tool,) if os.access(p, os.X_OK)), None
    )


class Namespace:
    """A network namespace with only lo, and the processes this test starts in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[subprocess.Popen[bytes]] = []

    def run(self, *command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *command: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *command],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process

    def dig(self, port: int, *query: str) -> tuple[str, list[str], str]:
        """(status, answer data, flags) of one query to 127.0.0.1:port in the namespace."""
        done = self.run(
            "dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=2", *query, timeout=20
        )
        output = done.stdout + done.stderr
        status = re.search(r"status: (\w+)", output)
        flags = re.search(r"flags: ([a-z ]*);", output)
        answers = re.findall(r"^\S+\s+\d+\s+IN\s+\S+\s+(\S+)$", output, re.MULTILINE)
        return (
            (status.group(1) if status else output.strip()),
            answers,
            (flags.group(1) if flags else ""),
        )


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    why = namespaces_unavailable()
    if os.environ.get("KUMAZONE_LAB") == "skip":
        pytest.skip(f"KUMAZONE_LAB=skip{': ' + why if why else ''}")
    for tool, package in (("unbound", "unbound"), ("dnsmasq", "dnsmasq-base"), ("dig", "")):
        if find(tool) is None:
            why = why or f"'{tool}' is not installed (make test installs {package or 'it'})"
    if not ROOT_KEY.is_file():
        why = why or f"{ROOT_KEY} is missing (apt-get install dns-root-data; make test does)"
    if why is not None:
        pytest.fail(
            f"the cluster DNS lab test cannot run here: {why}. "
            "Set KUMAZONE_LAB=skip to skip it explicitly.",
            pytrace=False,
        )
    made = Namespace(f"kzcd{os.getpid() % 100000}")
    subprocess.run(["ip", "netns", "del", made.name], capture_output=True)
    subprocess.run(["ip", "netns", "add", made.name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", made.name, "link", "set", "lo", "up"], check=True, timeout=10)
        yield made
    finally:
        for process in made.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        subprocess.run(["ip", "netns", "del", made.name], capture_output=True, timeout=10)


class NamespacedZone(ZoneProcess):
    """A zone process inside the namespace; its HTTP ports are read from inside too."""

    def __init__(self, namespace: Namespace, workdir: Path, resources: Path) -> None:
        super().__init__(workdir, resources)
        self.namespace = namespace

    def command(self) -> list[str]:
        command = [
            f"--dns-port={ZONE_DNS_PORT}" if part == "--dns-port=0" else part
            for part in super().command()
        ]
        return ["ip", "netns", "exec", self.namespace.name, *command]

    def http(
        self,
        server: str,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        assert method == "GET" and body is None, "only GET is read from the namespace"
        url = f"http://127.0.0.1:{self.ports[server]}{path}"
        done = self.namespace.run(str(BIN / "python"), str(LABCTL), "get", url, timeout=10)
        if done.returncode != 0:
            raise OSError(f"GET {url}: {done.stdout.strip()}")
        return 200, done.stdout.encode()


@pytest.fixture
def zone(namespace: Namespace, tmp_path: Path) -> Iterator[NamespacedZone]:
    resources = tmp_path / "resources"
    shutil.copytree(REPO / "zones" / "zone-1", resources)
    started = NamespacedZone(namespace, tmp_path, resources)
    try:
        yield started.start()
    finally:
        started.stop()


def install(flavor: str, tmp_path: Path) -> Path:
    """The drop-in, exactly as `kumazone install dns --flavor F --cp-address 127.0.0.1`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KUMA_")}
    done = subprocess.run(
        [str(BIN / "kumazone"), "install", "dns", "--flavor", flavor, "--cp-address", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    dropin = tmp_path / f"kumazone-{flavor}.conf"
    dropin.write_text(done.stdout)
    return dropin


def wait_answering(namespace: Namespace, port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while namespace.dig(port, "SOA", "mesh")[0] != "NOERROR":
        assert process.poll() is None, f"the forwarder on port {port} exited {process.returncode}"
        assert time.monotonic() < deadline, f"nothing answers mesh. SOA on port {port}"
        time.sleep(0.2)


def start_dnsmasq(namespace: Namespace, dropin: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    dnsmasq = find("dnsmasq")
    assert dnsmasq is not None
    # Its own minimal settings: listen here, no upstream, no hosts file; the rest is the
    # drop-in, loaded as the one configuration file.
    return namespace.start(
        dnsmasq,
        "--keep-in-foreground",
        f"--conf-file={dropin}",
        "--user=root",
        "--group=root",
        f"--pid-file={tmp_path / 'dnsmasq.pid'}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        f"--port={DNSMASQ_PORT}",
        "--no-resolv",
        "--no-hosts",
        "--log-queries",
        "--log-facility=-",
        log=tmp_path / "dnsmasq.log",
    )


def start_unbound(namespace: Namespace, dropin: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    unbound = find("unbound")
    assert unbound is not None
    config = tmp_path / "unbound.conf"
    # Its own minimal settings, with DNSSEC validation on (the root trust anchor from
    # dns-root-data); the rest is the drop-in, included as it is.
    config.write_text(
        f"""\
server:
    interface: 127.0.0.1
    port: {UNBOUND_PORT}
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{tmp_path}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    val-log-level: 2
    module-config: "validator iterator"
    trust-anchor-file: "{ROOT_KEY}"
    root-hints: "/usr/share/dns/root.hints"
remote-control:
    control-enable: no
include: "{dropin}"
"""
    )
    checked = subprocess.run(
        [str(Path(unbound).with_name("unbound-checkconf")), str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return namespace.start(unbound, "-d", "-c", str(config), log=tmp_path / "unbound.log")


def vips(zone: NamespacedZone) -> dict[str, dict[str, Any]]:
    return {i["service"]: i for i in zone.vips()["items"] if i["mesh"] == "default"}


def check_forwarder(namespace: Namespace, port: int, table: dict[str, dict[str, Any]]) -> None:
    """A, AAAA, the dotted form, PTR of both VIPs and NXDOMAIN, through the forwarder."""
    redis = table["redis"]
    assert namespace.dig(port, "redis.mesh", "A")[:2] == ("NOERROR", [redis["vip"]])
    assert namespace.dig(port, "redis.mesh", "AAAA")[:2] == ("NOERROR", [redis["vip6"]])
    dotted = table[DOTTED[0]]["vip"]
    assert namespace.dig(port, DOTTED[1], "A")[:2] == ("NOERROR", [dotted])
    for vip in (redis["vip"], redis["vip6"]):
        direct = namespace.dig(ZONE_DNS_PORT, "+norec", "-x", vip)
        assert direct[0] == "NOERROR" and direct[1], direct
        assert namespace.dig(port, "-x", vip)[:2] == ("NOERROR", direct[1]), vip
    assert namespace.dig(port, "no-such-service.mesh", "A")[:2] == ("NXDOMAIN", [])


def test_unbound_validating_resolver_forwards_to_the_zone(
    namespace: Namespace, zone: NamespacedZone, tmp_path: Path
) -> None:
    dropin = install("unbound", tmp_path)
    unbound = start_unbound(namespace, dropin, tmp_path)
    wait_answering(namespace, UNBOUND_PORT, unbound)
    table = vips(zone)
    check_forwarder(namespace, UNBOUND_PORT, table)
    # Validation is on: the answers are insecure (no AD), not bogus.
    assert "ad" not in namespace.dig(UNBOUND_PORT, "redis.mesh", "A")[2].split()


def test_unbound_without_insecure_marks_refuses_the_answers(
    namespace: Namespace, zone: NamespacedZone, tmp_path: Path
) -> None:
    """The control: validation is really on, so the domain-insecure lines are needed."""
    dropin = install("unbound", tmp_path)
    text = dropin.read_text()
    stripped = "".join(
        line for line in text.splitlines(keepends=True) if "domain-insecure" not in line
    )
    assert stripped != text
    dropin.write_text(stripped)
    unbound = start_unbound(namespace, dropin, tmp_path)
    deadline = time.monotonic() + 15
    while True:
        status = namespace.dig(UNBOUND_PORT, "redis.mesh", "A")[0]
        assert unbound.poll() is None, (tmp_path / "unbound.log").read_text()
        if status == "SERVFAIL" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == "SERVFAIL", (tmp_path / "unbound.log").read_text()


def test_dnsmasq_forwards_to_the_zone(
    namespace: Namespace, zone: NamespacedZone, tmp_path: Path
) -> None:
    dropin = install("dnsmasq", tmp_path)
    dnsmasq = start_dnsmasq(namespace, dropin, tmp_path)
    wait_answering(namespace, DNSMASQ_PORT, dnsmasq)
    check_forwarder(namespace, DNSMASQ_PORT, vips(zone))
    # Only what the drop-in forwards is forwarded: dnsmasq has no other upstream.
    assert namespace.dig(DNSMASQ_PORT, "example.com", "A")[0] == "REFUSED"
    assert json.loads(json.dumps(vips(zone)))  # the zone is still there and answering
