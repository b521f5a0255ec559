"""Data-plane DNS end to end, as a workload sees it (issue 13, item 6).

Two network namespaces that the test makes and removes, joined by a veth pair, on
documentation addresses only:

- ``infra``: the cluster DNS (dnsmasq on 192.0.2.53:53, serving one outside name and
  logging every query it gets) and a zone control plane (dataplane port on
  192.0.2.10:5678, mutual TLS with certificates from ``kumazone certs``);
- ``work``: a workload host whose resolv.conf points at the cluster DNS, with
  ``kumazone install transparent-proxy`` applied and two dataplanes running as
  their own user (``kzdp-e2e``, made and removed by the test): one of mesh
  ``default`` on 127.0.0.1/::1:15053 (where the redirect sends UDP and TCP 53), one
  of mesh ``other`` on 15054.

From the workload, as another user (``nobody``), real clients resolve a ``.mesh``
name to the zone's VIP and the outside name through the upstream: glibc (getent,
Python's getaddrinfo), musl (a probe built with musl-gcc), Node's c-ares, Java's
InetAddress and dig.  Needs root, like tests/lab/test_lab.py.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.test_lab import namespaces_unavailable, wait_for
from tests.lab.test_tproxy import normalised

BIN = Path(sys.executable).parent
TWISTD = str(BIN / "twistd")
KUMAZONE = str(BIN / "kumazone")

PREFIX = f"kzdp{os.getpid() % 100000}"
INFRA, WORK = f"{PREFIX}i", f"{PREFIX}w"
ZONE_ADDRESS, CLUSTER_DNS, WORKLOAD = "192.0.2.10", "192.0.2.53", "192.0.2.21"
OUTSIDE, OUTSIDE_ADDRESS = "outside.test", "192.0.2.80"
DP_USER, CLIENT_USER = "kzdp-e2e", "nobody"

RESOURCES = """\
type: Mesh
name: default
---
type: Mesh
name: other
---
type: Dataplane
mesh: default
name: web-1
networking:
  address: 198.51.100.11
  inbound:
    - port: 8080
      tags:
        kuma.io/service: web
---
type: Dataplane
mesh: other
name: db-1
networking:
  address: 198.51.100.12
  inbound:
    - port: 5432
      tags:
        kuma.io/service: db
"""

MUSL_PROBE = r"""
#include <netdb.h>
#include <stdio.h>
#include <arpa/inet.h>
#include <sys/socket.h>
int main(int argc, char **argv) {
    struct addrinfo hints = {0}, *found;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    int error = getaddrinfo(argv[1], NULL, &hints, &found);
    if (error) { printf("error %s\n", gai_strerror(error)); return 2; }
    char text[INET_ADDRSTRLEN];
    struct sockaddr_in *address = (struct sockaddr_in *)found->ai_addr;
    printf("%s\n", inet_ntop(AF_INET, &address->sin_addr, text, sizeof text));
    return 0;
}
"""

JAVA_PROBE = """
public class Probe {
    public static void main(String[] args) throws Exception {
        java.security.Security.setProperty("networkaddress.cache.ttl", "0");
        System.out.println(java.net.InetAddress.getByName(args[0]).getHostAddress());
    }
}
"""

NODE_PROBE = (
    "require('dns').promises.resolve4(process.argv[1])"
    ".then(a => console.log(a[0]), e => { console.log('error ' + e.code); process.exit(2); })"
)


def run(*command: str, check: bool = True, timeout: float = 60.0) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout + done.stderr


def in_ns(namespace: str, *command: str, check: bool = True, timeout: float = 60.0) -> str:
    return run("ip", "netns", "exec", namespace, *command, check=check, timeout=timeout)


def as_user(user: str, *command: str) -> list[str]:
    entry = pwd.getpwnam(user)
    return [
        "setpriv",
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--clear-groups",
        *command,
    ]


def normalised_rules(namespace: str) -> str:
    """Both families' rules in C{namespace}, as tests/lab/test_tproxy.py compares them
    (no comments, counters or empty tables: iptables cannot delete a table)."""
    return "\n".join(
        normalised(in_ns(namespace, save)) for save in ("iptables-save", "ip6tables-save")
    )


class Host:
    """A namespace's processes, started by the test, stopped by it."""

    def __init__(self, namespace: str, logs: Path) -> None:
        self.namespace = namespace
        self.logs = logs
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.out").open("wb")
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *command], stdout=log, stderr=log
        )
        self.processes[name] = process
        return process

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


def ports_of(data_dir: Path) -> dict[str, int] | None:
    try:
        return json.loads((data_dir / "ports.json").read_text())
    except (OSError, ValueError):
        return None


def http_get(namespace: str, url: str) -> tuple[int, Any]:
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n"
        "    print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
        "except OSError as e:\n"
        "    print(0); print(e)\n"
    )
    out = in_ns(namespace, sys.executable, "-c", script, url)
    status, _, body = out.partition("\n")
    try:
        return int(status), json.loads(body) if body.strip().startswith(("{", "[")) else body
    except ValueError:
        return 0, out


def http_put(namespace: str, url: str, document: Any) -> int:
    script = (
        "import sys, urllib.request\n"
        "r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), method='PUT',"
        " headers={'Content-Type': 'application/json'})\n"
        "print(urllib.request.urlopen(r, timeout=5).status)\n"
    )
    return int(in_ns(namespace, sys.executable, "-c", script, url, json.dumps(document)).strip())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    why = namespaces_unavailable()
    if why is not None:
        if os.environ.get("KUMAZONE_LAB") == "skip":
            pytest.skip(why)
        pytest.fail(f"the data-plane lab cannot run: {why} (KUMAZONE_LAB=skip skips it)")
    for tool in ("dnsmasq", "dig", "musl-gcc", "node", "java", "iptables-restore", "setpriv"):
        if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
            pytest.fail(f"{tool} is not installed (make test installs it with lab-tools)")
    # Everything the two users read lives in a directory they can enter (pytest's
    # own temporary directories are root's alone); removed at the end.
    root = Path(tempfile.mkdtemp(prefix="kzdp-e2e-"))
    root.chmod(0o755)
    made_user = False
    try:
        pwd.getpwnam(DP_USER)
    except KeyError:
        run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", DP_USER)
        made_user = True
    hosts: list[Host] = []
    made_netns_dir = False
    try:
        for namespace in (INFRA, WORK):
            run("ip", "netns", "del", namespace, check=False)
            run("ip", "netns", "add", namespace)
            in_ns(namespace, "ip", "link", "set", "lo", "up")
        run("ip", "link", "add", f"{PREFIX}a", "type", "veth", "peer", "name", f"{PREFIX}b")
        run("ip", "link", "set", f"{PREFIX}a", "netns", INFRA)
        run("ip", "link", "set", f"{PREFIX}b", "netns", WORK)
        for address in (ZONE_ADDRESS, CLUSTER_DNS):
            in_ns(INFRA, "ip", "addr", "add", f"{address}/24", "dev", f"{PREFIX}a")
        in_ns(INFRA, "ip", "link", "set", f"{PREFIX}a", "up")
        in_ns(WORK, "ip", "addr", "add", f"{WORKLOAD}/24", "dev", f"{PREFIX}b")
        in_ns(WORK, "ip", "link", "set", f"{PREFIX}b", "up")
        # The workload's resolv.conf, as `ip netns exec` shows it to the processes.
        netns_etc = Path("/etc/netns") / WORK
        made_netns_dir = True
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text(f"nameserver {CLUSTER_DNS}\noptions timeout:2\n")

        logs = root / "logs"
        logs.mkdir()
        infra, work = Host(INFRA, logs), Host(WORK, logs)
        hosts += [infra, work]

        # The cluster DNS: one outside name, every query logged.
        query_log = logs / "cluster-dns-queries.log"
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        infra.start(
            "cluster-dns",
            dnsmasq,
            "--keep-in-foreground",
            "--user=root",
            "--group=root",
            f"--listen-address={CLUSTER_DNS}",
            "--bind-interfaces",
            "--port=53",
            "--no-resolv",
            "--no-hosts",
            "--cache-size=0",
            f"--address=/{OUTSIDE}/{OUTSIDE_ADDRESS}",
            "--log-queries",
            f"--log-facility={query_log}",
        )

        # Certificates: the zone's names its address; one per dataplane.
        certs = root / "certs"
        run(
            KUMAZONE, "certs", "--out", str(certs), "--global-host", "kumazone-global",
            "--zone", "zone-1", "--zone-host", ZONE_ADDRESS,
            "--dataplane", "default/web-1", "--dataplane", "other/db-1",
        )  # fmt: skip
        for key in certs.glob("dp-*-key.pem"):
            os.chown(key, pwd.getpwnam(DP_USER).pw_uid, -1)

        resources = root / "resources"
        resources.mkdir()
        (resources / "zone.yaml").write_text(RESOURCES)
        zone_data = root / "zone-data"
        zone_command = [
            TWISTD, "-n", "--pidfile=", f"--logfile={logs / 'zone.log'}", "kumazone",
            "--role=zone", "--zone=zone-1", f"--resources={resources}",
            f"--data-dir={zone_data}", "--dns-port=0", "--dns-interface=127.0.0.1",
            "--api-port=0", "--diagnostics-port=0", "--dp-port=5678",
            f"--dp-interface={ZONE_ADDRESS}", f"--tls-cert={certs / 'zone-1.pem'}",
            f"--tls-key={certs / 'zone-1-key.pem'}", f"--tls-ca={certs / 'ca.pem'}",
        ]  # fmt: skip

        def start_zone() -> dict[str, int]:
            (zone_data / "ports.json").unlink(missing_ok=True)
            infra.start("zone", *zone_command)
            return wait_for("the zone wrote its ports", lambda: ports_of(zone_data), 30)

        zone_ports = start_zone()

        def start_dataplane(mesh: str, name: str, port: int) -> Path:
            data = root / f"dp-{mesh}-{name}"
            data.mkdir(exist_ok=True)
            os.chown(data, pwd.getpwnam(DP_USER).pw_uid, pwd.getpwnam(DP_USER).pw_gid)
            (data / "ports.json").unlink(missing_ok=True)
            work.start(
                f"dp-{mesh}",
                TWISTD, "-n", "--pidfile=", f"--logfile={logs / f'dp-{mesh}.log'}",
                "-u", DP_USER, "-g", DP_USER, "kumazone", "--role=dataplane",
                f"--cp-address={ZONE_ADDRESS}:5678", f"--data-dir={data}",
                f"--tls-cert={certs / f'dp-{mesh}-{name}.pem'}",
                f"--tls-key={certs / f'dp-{mesh}-{name}-key.pem'}",
                f"--tls-ca={certs / 'ca.pem'}", f"--dns-port={port}",
                f"--diagnostics-port={port - 15053 + 9902}",
            )  # fmt: skip
            return data

        def ready(port: int) -> bool:
            return http_get(WORK, f"http://127.0.0.1:{port}/ready")[0] == 200

        before_rules = normalised_rules(WORK)
        run_tp = [sys.executable, "-m", "kumazone", "install", "transparent-proxy"]
        in_ns(WORK, *run_tp, "--kuma-dp-user", DP_USER, "--redirect-all-dns-traffic")

        dp_default = start_dataplane("default", "web-1", 15053)
        dp_other = start_dataplane("other", "db-1", 15054)
        wait_for("the default dataplane is ready", lambda: ready(9902) or None, 30)
        wait_for("the other dataplane is ready", lambda: ready(9903) or None, 30)

        probes = root / "probes"
        probes.mkdir()
        (probes / "probe.c").write_text(MUSL_PROBE)
        run("musl-gcc", "-static", "-O1", "-o", str(probes / "musl-probe"), str(probes / "probe.c"))
        (probes / "Probe.java").write_text(JAVA_PROBE)
        run("javac", "-d", str(probes), str(probes / "Probe.java"))
        for path in probes.iterdir():
            path.chmod(0o755)
        probes.chmod(0o755)

        yield {
            "root": root,
            "infra": infra,
            "work": work,
            "zone_ports": zone_ports,
            "start_zone": start_zone,
            "start_dataplane": start_dataplane,
            "ready": ready,
            "dp_default": dp_default,
            "dp_other": dp_other,
            "query_log": query_log,
            "probes": probes,
            "before_rules": before_rules,
            "run_tp": run_tp,
            "logs": logs,
        }
    finally:
        for host in hosts:
            host.stop_all()
        for namespace in (INFRA, WORK):
            run("ip", "netns", "del", namespace, check=False)
        if made_netns_dir:
            shutil.rmtree(Path("/etc/netns") / WORK, ignore_errors=True)
        if made_user:
            run("userdel", DP_USER, check=False)
        logs_kept = tmp_path_factory.mktemp("dpnetns-logs")
        shutil.copytree(root / "logs", logs_kept, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


def vip_of(lab: dict[str, Any], service: str, mesh: str = "default") -> str:
    status, table = http_get(INFRA, f"http://127.0.0.1:{lab['zone_ports']['api']}/vips?size=1000")
    assert status == 200, table
    (item,) = [i for i in table["items"] if i["service"] == service and i["mesh"] == mesh]
    return str(item["vip"])


def dig(
    name: str, *options: str, qtype: str = "A", user: str = CLIENT_USER
) -> tuple[str, list[str]]:
    """(status, answers) of `dig` on the workload through its resolv.conf, as C{user}."""
    output = in_ns(
        WORK, *as_user(user, "dig", "+time=2", "+tries=1", *options, name, qtype), check=False
    )
    status = re.search(r"status: (\w+)", output)
    answers = re.findall(rf"^\S+\s+\d+\s+IN\s+{qtype}\s+(\S+)$", output, re.MULTILINE)
    return (status.group(1) if status else output.strip()), answers


def client_answers(lab: dict[str, Any], name: str) -> dict[str, str]:
    """What each real client on the workload resolves C{name} to (as an unprivileged user)."""
    probes = lab["probes"]
    commands = {
        "getent (glibc)": ["getent", "ahostsv4", name],
        "getaddrinfo (Python, glibc)": [
            "/usr/bin/python3", "-c",
            "import socket, sys; print(socket.getaddrinfo(sys.argv[1], 80, 2)[0][4][0])",
            name,
        ],
        "musl getaddrinfo": [str(probes / "musl-probe"), name],
        "node c-ares resolve4": ["node", "-e", NODE_PROBE, name],
        "java InetAddress": ["java", "-cp", str(probes), "Probe", name],
        "dig": ["dig", "+short", "+time=2", "+tries=1", name, "A"],
    }  # fmt: skip
    found = {}
    for client, command in commands.items():
        output = in_ns(WORK, *as_user(CLIENT_USER, *command), check=False, timeout=30)
        match = re.search(r"\b(\d+\.\d+\.\d+\.\d+)\b", output)
        found[client] = match.group(1) if match else output.strip()[-200:]
    return found


def test_every_client_resolves_mesh_names_and_outside_names(lab: dict[str, Any]) -> None:
    web = vip_of(lab, "web")
    assert web.startswith("24") or web.startswith("25")
    answers = client_answers(lab, "web.mesh")
    assert answers == dict.fromkeys(answers, web), answers
    outside = client_answers(lab, OUTSIDE)
    assert outside == dict.fromkeys(outside, OUTSIDE_ADDRESS), outside
    # Over TCP too (the redirect takes TCP 53 to the dataplane's TCP port).
    assert dig("web.mesh", "+tcp") == ("NOERROR", [web])
    assert dig(OUTSIDE, "+tcp") == ("NOERROR", [OUTSIDE_ADDRESS])


def test_an_unknown_mesh_name_is_nxdomain_and_never_reaches_the_upstream(
    lab: dict[str, Any],
) -> None:
    assert dig("no-such-service.mesh")[0] == "NXDOMAIN"
    assert dig(OUTSIDE)[0] == "NOERROR"  # the upstream's log is written by now
    log = wait_for(
        "the cluster DNS logged the outside query",
        lambda: next((t for t in [lab["query_log"].read_text()] if OUTSIDE in t), None),
        10,
    )
    assert "no-such-service" not in log
    assert ".mesh" not in log


def test_a_dataplane_of_another_mesh_sees_that_mesh_only(lab: dict[str, Any]) -> None:
    db = vip_of(lab, "db", "other")
    assert dig("db.mesh", "@127.0.0.1", "-p", "15054") == ("NOERROR", [db])
    assert dig("web.mesh", "@127.0.0.1", "-p", "15054")[0] == "NXDOMAIN"
    # The default mesh's dataplane (where the redirect goes) does not know db.
    assert dig("db.mesh")[0] == "NXDOMAIN"


def test_a_service_added_in_the_zone_answers_on_the_dataplane_within_a_second(
    lab: dict[str, Any],
) -> None:
    api = lab["zone_ports"]["api"]
    document = {
        "type": "Dataplane",
        "mesh": "default",
        "name": "orders-1",
        "networking": {
            "address": "198.51.100.13",
            "inbound": [{"port": 8080, "tags": {"kuma.io/service": "orders"}}],
        },
    }
    assert dig("orders.mesh")[0] == "NXDOMAIN"
    status = http_put(INFRA, f"http://127.0.0.1:{api}/meshes/default/dataplanes/orders-1", document)
    added = time.monotonic()
    assert status in (200, 201)
    vip = vip_of(lab, "orders")
    answered = wait_for(
        "orders.mesh answered on the dataplane",
        lambda: (
            time.monotonic()
            if dig("orders.mesh", "@127.0.0.1", "-p", "15053", user="root")[1] == [vip]
            else None
        ),
        5,
        every=0.02,
    )
    assert answered - added < 1.0, f"{answered - added:.2f}s"


def test_with_the_zone_stopped_and_the_dataplane_restarted_it_still_answers(
    lab: dict[str, Any],
) -> None:
    web = vip_of(lab, "web")
    lab["infra"].stop("zone")
    assert dig("web.mesh") == ("NOERROR", [web])
    lab["work"].stop("dp-default")
    lab["start_dataplane"]("default", "web-1", 15053)
    wait_for(
        "the restarted dataplane is ready from its store", lambda: lab["ready"](9902) or None, 30
    )
    assert dig("web.mesh") == ("NOERROR", [web])
    assert dig(OUTSIDE) == ("NOERROR", [OUTSIDE_ADDRESS])
    # The zone comes back: the dataplane reconnects and follows again.
    lab["zone_ports"] = lab["start_zone"]()
    connected = re.compile(r"^kumazone_dataplane_connected(\{[^}]*\})? 1(\.0)?$", re.MULTILINE)
    wait_for(
        "the dataplane reconnected",
        lambda: connected.search(str(http_get(WORK, "http://127.0.0.1:9902/metrics")[1])),
        30,
    )


def test_uninstall_restores_the_rules(lab: dict[str, Any]) -> None:
    in_ns(WORK, *lab["run_tp"][:-2], "uninstall", "transparent-proxy")
    assert normalised_rules(WORK) == lab["before_rules"]
    # Without the redirect, dig goes to the cluster DNS, which knows no .mesh.
    assert dig("web.mesh")[1] == []
    assert dig(OUTSIDE) == ("NOERROR", [OUTSIDE_ADDRESS])
