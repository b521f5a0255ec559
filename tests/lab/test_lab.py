"""The multi-zone lab (lab/): the namespace lab run end to end as lab/README.md walks
through it, and what can be checked of the Docker Compose version without Docker.

The namespace lab needs root.  Where network namespaces cannot be created the test
fails and says why, unless ``KUMAZONE_LAB=skip`` is set, which skips it.  It runs
under its own namespace prefix, state directory and dataplane user, so a developer's
``make lab`` is left alone, and with BIN pointing at the virtualenv that runs the tests.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
BIN = Path(sys.executable).parent
T = TypeVar("T")

# A service only zone-2 has, and the Kubernetes-style name in its dotted form.
CROSS_ZONE = "web"
DOTTED = ("echo-server_echo-example_svc_1010", "echo-server.echo-example.svc.1010.mesh")
# A service of the other mesh (payments): not a name of the clients' dataplanes (default).
OTHER_MESH = "ledger"
# The one name the cluster DNS serves.
OUTSIDE = ("outside.lab.test", "198.51.100.80")
CLUSTER_DNS = "198.51.100.250"
ADDED = "orders"
LATER = "billing"
SERVICE_FILE = """\
# Added by the lab walkthrough: a service in zone-2 only.
type: Dataplane
mesh: default
name: {service}-1
networking:
  address: {address}
  inbound:
    - port: 8080
      tags:
        kuma.io/service: {service}
"""
LOCAL = 'kumazone_dataplane_queries{source="local"}'
UPSTREAM = 'kumazone_dataplane_queries{source="upstream"}'
CONNECTED = "kumazone_dataplane_connected"


# -- the namespace lab ---------------------------------------------------------------


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run the namespace lab, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, /etc/netns)"
    for tool, package in (("ip", "iproute2"), ("make", "make")):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install {package})"
    probe = f"kzprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def alive(pid: int) -> bool:
    """Running and not a zombie (the lab's daemons are init's children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.2) -> T:
    """Poll probe until it returns something other than None (or fail, saying what)."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f}s: {what}")
        time.sleep(every)


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class Lab:
    """One namespace lab, driven through make and lab/lab.sh as a user would."""

    def __init__(self, state: Path, prefix: str) -> None:
        self.state = state
        self.prefix = prefix
        self.dp_user = f"{prefix}dp"
        self.settings = [f"BIN={BIN}", f"LAB_STATE={state}", f"LAB_PREFIX={prefix}"]
        self.env = {**os.environ, "BIN": str(BIN), "LAB_STATE": str(state), "LAB_PREFIX": prefix}
        self.pids: set[int] = set()

    def assert_nothing_left(self, user_was_there: bool) -> None:
        """After lab-down: no namespace, process or dataplane user of this lab's."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        namespaces = set(self.namespaces())
        assert not namespaces & {line.split()[0] for line in listed.splitlines() if line}
        assert not [pid for pid in self.pids if alive(pid)]
        assert not [p for p in namespaces if Path("/etc/netns", p).exists()]
        assert user_exists(self.dp_user) == user_was_there
        state = str(self.state)
        leftovers = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and alive(int(proc.name)):
                try:
                    if state in (proc / "cmdline").read_bytes().decode(errors="replace"):
                        leftovers.append(proc.name)
                except OSError:
                    pass
        assert not leftovers, leftovers

    def namespaces(self) -> list[str]:
        hosts = ["net", "global", "zone1", "zone2", "clusterdns", "client1", "client2"]
        return [self.prefix + host for host in hosts]

    def run(self, command: list[str], timeout: float = 60.0, check: bool = True) -> str:
        done = subprocess.run(
            command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        output = done.stdout + done.stderr
        if check and done.returncode != 0:
            raise AssertionError(f"{shlex.join(command)} exited {done.returncode}:\n{output}")
        return output

    def make(self, target: str, timeout: float = 120.0) -> str:
        return self.run(["make", "--no-print-directory", target, *self.settings], timeout)

    def lab_sh(self, *args: str) -> str:
        return self.run(["bash", str(LAB / "lab.sh"), *args])

    def namespace(self, host: str) -> str:
        return self.prefix + host.replace("-", "")

    def in_host(self, host: str, *command: str, check: bool = True) -> str:
        return self.run(["ip", "netns", "exec", self.namespace(host), *command], check=check)

    def labctl(self, host: str, *args: str) -> Any:
        return json.loads(self.in_host(host, str(BIN / "python"), str(LAB / "labctl.py"), *args))

    def api(self, host: str, path: str) -> Any:
        topology = json.loads((self.state / "lab.json").read_text())
        return self.labctl(host, "get", topology["hosts"][host]["api"] + path)

    def vips(self, zone: str) -> dict[str, dict[str, Any]]:
        return {i["service"]: i for i in self.api(zone, "/vips")["items"] if i["mesh"] == "default"}

    def dataplane(self, client: str) -> dict[str, Any]:
        """The client's dataplane: {"ready": ..., "metrics": {...}} from its port 9902."""
        document: dict[str, Any] = self.labctl(
            client, "fetch", "dataplane", "http://127.0.0.1:9902"
        )
        return document

    def dig(self, client: str, name: str, qtype: str = "A", *options: str) -> tuple[str, list[str]]:
        """(status, answers) of `dig name` on a client host, through its resolv.conf."""
        command = ["dig", "+time=2", "+tries=1", *options, name, qtype]
        output = self.in_host(client, *command, check=False)
        status = re.search(r"status: (\w+)", output)
        answers = re.findall(rf"^\S+\s+\d+\s+IN\s+{qtype}\s+(\S+)$", output, re.MULTILINE)
        return (status.group(1) if status else output.strip()), answers

    def getent(self, client: str, database: str, name: str, *as_user: str) -> list[str]:
        output = self.in_host(client, *as_user, "getent", database, name, check=False)
        return [line.split()[0] for line in output.splitlines() if line.strip()]

    def rules(self, client: str) -> str:
        return self.in_host(client, "iptables-save") + self.in_host(client, "ip6tables-save")

    def queries_at_cluster_dns(self) -> str:
        return (self.state / "logs" / "cluster-dns.log").read_text()

    def record_pids(self) -> None:
        """Remember every process the lab started (checked gone after lab-down)."""
        for pidfile in (self.state / "run").rglob("*.pid"):
            text = pidfile.read_text().strip()
            if text.isdigit():
                self.pids.add(int(text))


L = TypeVar("L", bound=Lab)


@contextmanager
def lab_running(tmp_path: Path, kind: Callable[[Path, str], L], prefix: str) -> Iterator[L]:
    """A lab of C{kind} under its own state and namespace C{prefix} (the pid is added),
    down again afterwards whatever happened, its logs kept in C{tmp_path}."""
    why = namespaces_unavailable()
    if os.environ.get("KUMAZONE_LAB") == "skip":
        pytest.skip(f"KUMAZONE_LAB=skip{': ' + why if why else ''}")
    if why is not None:
        pytest.fail(
            f"the namespace lab cannot run here: {why}. "
            "Set KUMAZONE_LAB=skip to skip it explicitly.",
            pytrace=False,
        )
    # The dataplanes (and the lab's PostgreSQL) run as their own users, who must reach
    # their data under the state: not in pytest's temporary directory, which only root
    # may enter.  (The logs are copied there at the end.)
    root = Path(tempfile.mkdtemp(prefix="kzlab-test-"))
    root.chmod(0o755)
    started = kind(root / "state", f"{prefix}{os.getpid() % 100000}-")
    try:
        yield started
    finally:
        # Whatever happened, nothing of this lab stays running.
        try:
            started.make("lab-down")
        finally:
            # The logs stay where pytest keeps a test's files.
            if (started.state / "logs").is_dir():
                shutil.copytree(started.state / "logs", tmp_path / "logs", dirs_exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with lab_running(tmp_path, Lab, "kzt") as started:
        yield started


def test_lab_walkthrough(lab: Lab) -> None:
    """make lab; names through each client's dataplane; the global, then a zone, stop."""
    began = time.monotonic()
    user_was_there = user_exists(lab.dp_user)
    output = lab.make("lab")
    assert "hold the global's table" in output, output
    assert "the dataplanes of client-1 and client-2 too" in output, output
    lab.record_pids()
    # global, zone-1, zone-2, the cluster DNS and a dataplane per client.
    assert len(lab.pids) == 6, sorted((lab.state / "run").rglob("*"))

    # 1. What runs on a client: the dataplane as its own user, the transparent proxy's
    #    rules (port 53 from every other user goes to it), resolv.conf at the cluster DNS.
    dp_uid = pwd.getpwnam(lab.dp_user).pw_uid
    for client in ("client-1", "client-2"):
        pid = int((lab.state / "run" / "dataplanes" / f"{client}.pid").read_text())
        uids = re.search(r"^Uid:\s+(.*)$", Path(f"/proc/{pid}/status").read_text(), re.M)
        assert uids and set(uids.group(1).split()) == {str(dp_uid)}, client
        rules = lab.rules(client)
        assert f"--uid-owner {dp_uid} -j RETURN" in rules, rules
        assert "-j REDIRECT --to-ports 15053" in rules, rules
        assert lab.in_host(client, "cat", "/etc/resolv.conf").count("nameserver") == 1
        assert f"nameserver {CLUSTER_DNS}" in lab.in_host(client, "cat", "/etc/resolv.conf")

    # 2. Mesh names from both zones' workloads through their system resolver: the
    #    redirect takes them to the dataplane, which answers them from its table.
    vips = lab.vips("zone-2")
    web = vips[CROSS_ZONE]
    before = {c: lab.dataplane(c)["metrics"] for c in ("client-1", "client-2")}
    for client in ("client-1", "client-2"):
        assert lab.dig(client, f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]]), client
        assert lab.dig(client, f"{CROSS_ZONE}.mesh", "AAAA") == ("NOERROR", [web["vip6"]])
        assert lab.dig(client, f"{CROSS_ZONE}.mesh", "A", "+tcp") == ("NOERROR", [web["vip"]])
        assert lab.dig(client, DOTTED[1]) == ("NOERROR", [vips[DOTTED[0]]["vip"]]), client
        assert lab.dig(client, web["vip"], "PTR", "-x")[1] == [f"{CROSS_ZONE}.mesh."]
        # Unknown under mesh. (and another mesh's service): NXDOMAIN, from the dataplane.
        assert lab.dig(client, "no-such-service.mesh")[0] == "NXDOMAIN"
        assert lab.dig(client, f"{OTHER_MESH}.mesh")[0] == "NXDOMAIN"
        # Every DNS query is redirected, whatever the address it was sent to.
        answer = lab.dig(client, f"{CROSS_ZONE}.mesh", "A", f"@{CLUSTER_DNS}")
        assert answer == ("NOERROR", [web["vip"]]), client
        assert lab.getent(client, "ahostsv4", f"{CROSS_ZONE}.mesh")[0] == web["vip"]
        assert lab.getent(client, "hosts", f"{CROSS_ZONE}.mesh")[0] in (web["vip"], web["vip6"])
        # Any user's but the dataplane's.
        nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
        assert lab.getent(client, "ahostsv4", f"{CROSS_ZONE}.mesh", *nobody)[0] == web["vip"]
    # zone-1's own inventory lacks the service: it came through the global.
    assert web["zones"] == ["zone-2"] and not web["provisional"]
    assert lab.vips("zone-1")[CROSS_ZONE]["vip"] == web["vip"]

    # 3. Other names go to resolv.conf's nameserver, the cluster DNS, as they came.
    for client in ("client-1", "client-2"):
        assert lab.dig(client, OUTSIDE[0]) == ("NOERROR", [OUTSIDE[1]]), client
        assert lab.getent(client, "ahostsv4", OUTSIDE[0])[0] == OUTSIDE[1]
        assert lab.dig(client, f"nothing.{OUTSIDE[0].partition('.')[2]}")[0] == "NXDOMAIN"
        assert lab.dig(client, "example.com")[0] == "REFUSED"  # nothing leaves the lab
    # Each client's dataplane answered its 8 digs of mesh names (and getent's) itself
    # and forwarded the 3 digs of other names (and getent's).
    for client in ("client-1", "client-2"):
        after = lab.dataplane(client)["metrics"]
        assert after[LOCAL] - before[client][LOCAL] >= 8 + 3, (client, after)
        assert after[UPSTREAM] - before[client][UPSTREAM] >= 3 + 1, (client, after)
    seen = lab.queries_at_cluster_dns()
    assert f"query[A] {OUTSIDE[0]} from 198.51.100.221" in seen, seen
    assert f"query[A] {OUTSIDE[0]} from 198.51.100.222" in seen, seen
    assert ".mesh" not in seen and "in-addr.arpa" not in seen, seen

    status = lab.make("lab-status")
    web_row = next(line for line in status.splitlines() if f"default/{CROSS_ZONE} " in line)
    assert web_row.split()[1:] == [web["vip"]] * 3, status
    assert "zone-1 and zone-2 agree on all" in status, status
    version = lab.api("zone-1", "/")["tableVersion"]
    assert re.search(r"^/ready\s+ready\s+ready$", status, re.M), status
    assert re.search(r"^to the zone\s+connected\s+connected$", status, re.M), status
    assert re.search(rf"^table version\s+{version}\s+{version}$", status, re.M), status
    (connected,) = lab.api("zone-1", "/dataplanes/connected")["items"]
    assert (connected["mesh"], connected["name"], connected["version"]) == (
        "default",
        "client-1",
        version,
    )
    assert connected["address"] == "198.51.100.221"

    # 4. The global stops: both zones, and so both dataplanes, keep their last table.
    lab.lab_sh("stop", "global")
    assert not (lab.state / "run" / "global.pid").exists()
    wait_for(
        "zone-1 notices that the global is gone",
        lambda: True if not lab.api("zone-1", "/")["sync"]["connected"] else None,
        10,
    )
    for client in ("client-1", "client-2"):
        assert lab.dig(client, f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]]), client
        assert lab.dig(client, DOTTED[1]) == ("NOERROR", [vips[DOTTED[0]]["vip"]]), client
    assert "DISCONNECTED" in lab.make("lab-status")

    # 5. A service added in zone-2 meanwhile: zone-2 pushes it to its dataplane at
    #    once, with a provisional VIP; zone-1 cannot know it while the global is away.
    zone_2 = lab.state / "zones" / "zone-2"
    (zone_2 / f"{ADDED}.yaml").write_text(
        SERVICE_FILE.format(service=ADDED, address="198.51.100.60")
    )
    added_at = time.monotonic()
    provisional = wait_for(
        "zone-2's client resolves the added service",
        lambda: lab.dig("client-2", f"{ADDED}.mesh")[1] or None,
        5,
        every=0.05,
    )
    assert time.monotonic() - added_at < 5
    added = lab.vips("zone-2")[ADDED]
    assert added["provisional"] and provisional == [added["vip"]]
    assert lab.dig("client-1", f"{ADDED}.mesh") == ("NXDOMAIN", [])
    status = lab.make("lab-status")
    assert re.search(rf"^! default/{ADDED} .* - .*\(provisional\)", status, re.M), status

    # 6. The global comes back: zone-1 learns the service, with zone-2's VIP, and
    #    gives it to client-1's dataplane.
    lab.lab_sh("start", "global")
    lab.record_pids()
    answer = wait_for(
        "zone-1's client resolves the service added in zone-2",
        lambda: lab.dig("client-1", f"{ADDED}.mesh")[1] or None,
        30,
    )
    assert answer == [added["vip"]]
    lab.lab_sh("wait-synced", "30")
    assert lab.vips("zone-2")[ADDED]["provisional"] is False
    assert lab.vips("zone-1")[ADDED]["vip"] == added["vip"]
    status = lab.make("lab-status")
    added_row = next(line for line in status.splitlines() if f"default/{ADDED} " in line)
    assert added_row.split()[1:] == [added["vip"]] * 3, status
    assert "zone-1 and zone-2 agree on all" in status, status
    assert "connected since" in status and "DISCONNECTED" not in status, status

    # 7. With everything up, a name added in zone-2 answers on client-1 within seconds:
    #    zone-2, the global, zone-1, client-1's dataplane, each pushing the change.
    (zone_2 / f"{LATER}.yaml").write_text(
        SERVICE_FILE.format(service=LATER, address="198.51.100.61")
    )
    added_at = time.monotonic()
    wait_for(
        "client-1 resolves a service just added in zone-2",
        lambda: lab.dig("client-1", f"{LATER}.mesh")[1] or None,
        5,
        every=0.05,
    )
    assert time.monotonic() - added_at < 5
    later = lab.vips("zone-1")[LATER]["vip"]

    # 8. zone-1 stops: client-1's dataplane answers from its table; restarted while
    #    the zone is away, from the table it stored.  Then the zone comes back.
    lab.lab_sh("stop", "zone-1")
    expected = {CROSS_ZONE: web["vip"], ADDED: added["vip"], LATER: later}
    for round_ in ("zone-1 stopped", "dataplane restarted"):
        for service, vip in expected.items():
            assert lab.dig("client-1", f"{service}.mesh") == ("NOERROR", [vip]), round_
        assert lab.dig("client-1", OUTSIDE[0]) == ("NOERROR", [OUTSIDE[1]]), round_
        if round_ == "zone-1 stopped":
            wait_for(
                "client-1's dataplane sees zone-1 gone",
                lambda: True if not lab.dataplane("client-1")["metrics"][CONNECTED] else None,
                5,
            )
            lab.lab_sh("stop", "client-1")
            lab.lab_sh("start", "client-1")
            lab.record_pids()
    lab.lab_sh("start", "zone-1")
    lab.record_pids()
    wait_for(
        "client-1's dataplane reconnects to zone-1",
        lambda: True if lab.dataplane("client-1")["metrics"][CONNECTED] else None,
        20,
    )
    lab.lab_sh("wait-synced", "30")

    # 9. The transparent proxy uninstalled: the rules are gone, and client-1's queries
    #    reach the cluster DNS itself, which knows nothing of mesh.
    lab.in_host("client-1", str(BIN / "kumazone"), "uninstall", "transparent-proxy")
    assert "KUMAZONE_DNS" not in lab.rules("client-1")
    assert lab.dig("client-1", f"{CROSS_ZONE}.mesh")[0] == "REFUSED"
    assert lab.dig("client-1", OUTSIDE[0]) == ("NOERROR", [OUTSIDE[1]])
    assert f"{CROSS_ZONE}.mesh from 198.51.100.221" in lab.queries_at_cluster_dns()
    assert lab.dig("client-2", f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]])

    # 10. make lab-down leaves nothing behind, and can run again.
    lab.record_pids()
    lab.make("lab-down")
    lab.make("lab-down")
    lab.assert_nothing_left(user_was_there)
    assert time.monotonic() - began < 150


# -- the Docker Compose file (tests/lab/test_docker_lab.py runs it for real) -----------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load((LAB / "docker-compose.yml").read_text())


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", help_text))


def _help(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every volume of a service."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append((str(volume["source"]), str(volume["target"])))
        else:
            source, target = str(volume).split(":")[:2]
            found.append((source, target))
    return found


def test_compose_file_parses_and_has_the_lab_topology() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"certs", "global", "zone-1", "zone-2", "client-1", "client-2"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for network in service.get("networks", {}):
            assert network in compose.get("networks", {}), f"{name}: network {network}"
    assert compose["networks"]["lab"]["internal"] is True
    addresses = {
        n: s["networks"]["lab"]["ipv4_address"] for n, s in services.items() if "networks" in s
    }
    assert all(a.startswith("198.51.100.") for a in addresses.values()), addresses
    assert services["global"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )
    # The clients have dig, and a resolver that forwards mesh. to their zone, only.
    dockerfile = (LAB / "Dockerfile").read_text()
    assert "bind9-dnsutils" in dockerfile and "dnsmasq-base" in dockerfile
    for client, zone in (("client-1", "zone-1"), ("client-2", "zone-2")):
        script = " ".join(_command(services[client]))
        # The forwarding (domain and reverse zones) is kumazone install dns's drop-in.
        assert (
            f"kumazone install dns --flavor dnsmasq --cp-address {addresses[zone]}:5653" in script
        )
        assert "--no-resolv" in script and "--server=" not in script


def test_compose_commands_use_only_flags_kumazone_lists() -> None:
    plugin_flags = _flags(_help(str(BIN / "twistd"), "kumazone", "--help"))
    twistd_flags = _flags(_help(str(BIN / "twistd"), "--help"))
    certs_flags = _flags(_help(str(BIN / "kumazone"), "certs", "--help"))
    assert {"--role", "--zone", "--global", "--tls-cert"} <= plugin_flags
    checked = 0
    for name, service in _compose()["services"].items():
        command = _command(service)
        if command[:2] == ["kumazone", "certs"]:
            used, allowed = command[2:], certs_flags
        elif command[:1] == ["twistd"]:
            assert "kumazone" in command, f"{name}: twistd without the kumazone plugin"
            at = command.index("kumazone")
            for option in command[1:at]:
                assert option.split("=")[0] in twistd_flags, f"{name}: twistd {option}"
            used, allowed = command[at + 1 :], plugin_flags
        else:
            assert "kumazone" not in command, f"{name}: a kumazone command not checked"
            continue
        for option in used:
            assert option.startswith("-"), f"{name}: {option!r} is not a flag"
            assert option.split("=")[0] in allowed, f"{name}: {option} is not a kumazone flag"
        checked += 1
    assert checked == 4


def test_compose_mounts_and_build_files_exist() -> None:
    compose = _compose()
    named = set(compose.get("volumes") or {})
    mounted_paths: dict[str, dict[str, Path]] = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (LAB / build["context"]).resolve()
            dockerfile = context / build["dockerfile"]
            assert dockerfile.is_file(), dockerfile
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY "):
                    for source in line.split()[1:-1]:
                        assert (context / source).exists(), f"COPY {source}"
        for source, target in _mounts(service):
            if source.startswith((".", "/")):
                path = (LAB / source).resolve()
                assert path.exists(), f"{name} mounts {source}: {path} does not exist"
                assert path.is_relative_to(REPO), f"{name} mounts {path}, outside the repository"
                mounted_paths.setdefault(name, {})[target] = path
            else:
                assert source in named, f"{name}: volume {source} is not declared"
    # Every --resources directory a zone is given is a mounted directory of the repository.
    for name, service in compose["services"].items():
        for option in _command(service):
            if option.startswith("--resources="):
                inside = option.split("=", 1)[1]
                for target, path in mounted_paths.get(name, {}).items():
                    if inside.startswith(target + "/"):
                        assert (path / inside[len(target) + 1 :]).is_dir(), option
                        break
                else:
                    raise AssertionError(f"{name}: {option} is not mounted")
