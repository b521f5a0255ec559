"""The Docker Compose lab run for real: `make lab-docker`, lab/README.md's Docker walkthrough.

What it needs, it sets up, and it takes down what it set up:

- Debian's docker.io, a Compose (v2 if there, else Debian's v1) and debootstrap,
  installed with ``make lab-docker-tools`` when missing;
- a Docker engine: the one running, or a dockerd started here and stopped at the end
  (its iptables rules removed with it).  That daemon makes no default bridge
  (``--bridge=none``), draws networks only from documentation addresses, turns on no
  forwarding and no masquerading; image builds run with ``--network=none`` and the
  lab's network is internal, so no container packet can leave the machine;
- a base image made with debootstrap by lab/docker/base-image.sh, cached by content
  under /var/cache/kumazone-lab (reused by later runs and other checkouts);
- kumazone's wheels, built on the host; the image installs from them only.

Then it walks the Docker section of lab/README.md through the same commands a user
has (lab/docker/lab-docker.sh compose ...), and ``make lab-docker-down`` must leave
no container, network, volume or dangling image of the lab.  The run's timings are
printed (``pytest -s`` shows them) and written to LAB_STATE/timings.json.

Where no Docker engine can run, the test fails and says why, unless
``KUMAZONE_LAB=skip`` is set, which skips it (as for the namespace lab).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "lab"
BIN = Path(sys.executable).parent
#: What a dockerd started here may use: documentation addresses only.  The lab's
#: network is 198.51.100.192/26 (lab/docker-compose.yml); any other comes from here.
ADDRESS_POOL = "198.51.100.0/25"
LAB_SUBNET = "198.51.100.192/26"
DOCKERD_FLAGS = (
    "--bridge=none",
    f"--default-address-pool=base={ADDRESS_POOL},size=28",
    "--ip-forward=false",
    "--ip-masq=false",
)
LABEL = "org.kumazone.lab=1"
#: One Docker lab test at a time on a machine (two checkouts' `make test` at once
#: would share the engine, the lab's subnet and the daemon this test starts).
LOCK = Path("/var/lock/kumazone-docker-lab.lock")
LOCK_WAIT = 900.0
ORDERS = {
    "type": "Dataplane",
    "mesh": "default",
    "name": "orders-1",
    "networking": {
        "address": "198.51.100.60",
        "inbound": [{"port": 8080, "tags": {"kuma.io/service": "orders"}}],
    },
}


def run(
    command: list[str],
    timeout: float = 120.0,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> str:
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {done.returncode}:\n{output}")
    return output


def docker_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def routes_in_the_way() -> str | None:
    """A route of this host that the lab's addresses would shadow, or None."""
    ours = [ipaddress.ip_network(ADDRESS_POOL), ipaddress.ip_network(LAB_SUBNET)]
    for line in run(["ip", "-4", "route", "show"], check=False).splitlines():
        first = line.split()[0] if line.split() else ""
        if first == "default":
            continue
        try:
            network = ipaddress.ip_network(first, strict=False)
        except ValueError:
            continue
        if any(network.overlaps(o) for o in ours):
            return f"this host routes {network} already ({line.strip()})"
    return None


class Engine:
    """The Docker engine the test uses: the running one, or a dockerd of its own."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.process: subprocess.Popen[bytes] | None = None
        self.iptables: dict[str, bytes] = {}

    def tools(self) -> str | None:
        """Install what is missing (make lab-docker-tools); why not, or None."""
        if os.geteuid() != 0:
            return "the Docker lab test needs root (dockerd, debootstrap)"
        if shutil.which("make") is None:
            return "'make' is not installed"
        done = subprocess.run(
            ["make", "--no-print-directory", "lab-docker-tools"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            return f"make lab-docker-tools failed: {(done.stdout + done.stderr).strip()[-400:]}"
        for tool in ("docker", "dockerd", "debootstrap"):
            if shutil.which(tool) is None and not os.access(f"/usr/sbin/{tool}", os.X_OK):
                return f"{tool} is not installed (apt-get install docker.io debootstrap)"
        return None

    def start(self) -> str | None:
        """Use the engine that answers, or start one; why none can run, or None."""
        if docker_answers():
            return None
        in_the_way = routes_in_the_way()
        if in_the_way is not None:
            return f"cannot start a Docker engine on documentation addresses: {in_the_way}"
        for table in ("iptables", "ip6tables"):
            saved = subprocess.run([f"{table}-save"], capture_output=True, timeout=30)
            if saved.returncode == 0:
                self.iptables[table] = saved.stdout
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        log = open(self.work / "dockerd.log", "wb")  # the daemon's, kept open by it
        self.process = subprocess.Popen(
            [dockerd, *DOCKERD_FLAGS, f"--pidfile={self.work / 'dockerd.pid'}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"dockerd exited {self.process.returncode}: {self.log_tail()}"
            if docker_answers():
                return None
            time.sleep(0.3)
        return f"dockerd did not answer within 60s: {self.log_tail()}"

    def log_tail(self) -> str:
        path = self.work / "dockerd.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return " | ".join(lines[-5:])

    def stop(self) -> None:
        """Stop the dockerd started here (if any) and take its iptables rules away."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for table, saved in self.iptables.items():
            subprocess.run([f"{table}-restore"], input=saved, capture_output=True, timeout=30)


class DockerLab:
    """One Docker lab, under its own project, image and state; driven as a user drives it."""

    def __init__(self, state: Path) -> None:
        self.state = state
        suffix = os.getpid() % 100000
        self.project = f"kzlabtest{suffix}"
        self.image = f"kumazone-lab-test:{suffix}"
        self.settings = {
            "BIN": str(BIN),
            "LAB_STATE": str(state),
            "LAB_PROJECT": self.project,
            "LAB_IMAGE": self.image,
            "LAB_BUILD_NETWORK": "none",
        }
        self.env = {**os.environ, **self.settings}
        self.timings: dict[str, float] = {}

    def make(self, target: str, timeout: float = 600.0, **more: str) -> str:
        settings = [f"{k}={v}" for k, v in {**self.settings, **more}.items()]
        return run(["make", "--no-print-directory", target, *settings], timeout, env=self.env)

    def compose(self, *args: str, check: bool = True, timeout: float = 60.0) -> str:
        command = ["bash", str(LAB / "docker" / "lab-docker.sh"), "compose", *args]
        return run(command, timeout, check=check, env=self.env)

    def exec(self, service: str, *command: str, check: bool = True) -> str:
        return self.compose("exec", "-T", service, *command, check=check)

    def dig(self, client: str, *queries: list[str]) -> list[tuple[str, list[str]]]:
        """(status, answers) of each query, by one dig on a client, through its resolv.conf."""
        command = ["dig", "+time=2", "+tries=1"]
        for query in queries:
            command += query
        output = self.exec(client, *command, check=False)
        found = []
        for block in output.split(";; ->>HEADER<<-")[1:]:
            status = re.search(r"status: (\w+)", block)
            answers = re.findall(r"^\S+\s+\d+\s+IN\s+\S+\s+(\S+)$", block, re.MULTILINE)
            found.append((status.group(1) if status else "?", answers))
        assert len(found) == len(queries), output
        return found

    def api(self, service: str, method: str, path: str, document: Any = None) -> Any:
        """The API of a control plane, from inside its container (it listens on the lab net)."""
        script = (
            "import json, sys, urllib.request as u\n"
            "body = sys.argv[3].encode() if sys.argv[3] else None\n"
            "r = u.Request('http://127.0.0.1:5681' + sys.argv[2], data=body, method=sys.argv[1],"
            " headers={'Content-Type': 'application/json', 'Accept': 'application/json'})\n"
            "print(u.urlopen(r, timeout=5).read().decode())\n"
        )
        body = json.dumps(document) if document is not None else ""
        return json.loads(self.exec(service, "python3", "-c", script, method, path, body))

    def vips(self, service: str) -> dict[str, dict[str, Any]]:
        page = self.api(service, "GET", "/vips?size=1000")
        assert page["next"] is None
        return {i["service"]: i for i in page["items"] if i["mesh"] == "default"}

    def containers(self) -> dict[str, str]:
        """Each service of the lab and its container's status (Compose v1 and v2 alike)."""
        label = f"label=com.docker.compose.project={self.project}"
        shown = '{{.Label "com.docker.compose.service"}}\t{{.Status}}'
        output = run(["docker", "ps", "-a", "--filter", label, "--format", shown])
        return dict(line.split("\t", 1) for line in output.splitlines() if line.strip())

    def leftovers(self) -> dict[str, list[str]]:
        """Whatever of this lab the engine still has."""
        label = f"label=com.docker.compose.project={self.project}"
        found = {
            "containers": run(["docker", "ps", "-aq", "--filter", label]),
            "networks": run(["docker", "network", "ls", "-q", "--filter", label]),
            "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]),
            "dangling images": run(
                [
                    "docker",
                    "images",
                    "-q",
                    "--filter",
                    "dangling=true",
                    "--filter",
                    f"label={LABEL}",
                ]
            ),
        }
        return {kind: output.split() for kind, output in found.items() if output.split()}


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """Hold the machine-wide lock of the Docker lab test (waiting, bounded, for another)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another Docker lab test held {LOCK} for {LOCK_WAIT:.0f}s")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    skip = os.environ.get("KUMAZONE_LAB") == "skip"
    if skip:
        pytest.skip("KUMAZONE_LAB=skip")
    with machine_lock():
        yield from _engine(tmp_path_factory)


def _engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    started = Engine(tmp_path_factory.mktemp("docker-engine"))
    try:
        why = started.tools() or started.start()
        if why is not None:
            pytest.fail(
                f"the Docker lab cannot run here: {why}. "
                "Set KUMAZONE_LAB=skip to skip it explicitly.",
                pytrace=False,
            )
        yield started
    finally:
        started.stop()


@pytest.fixture
def docker_lab(engine: Engine, tmp_path: Path) -> Iterator[DockerLab]:
    lab = DockerLab(tmp_path / "state")
    try:
        yield lab
    finally:
        # Whatever happened: no container, network, volume or image of this lab stays.
        try:
            lab.make("lab-docker-down", timeout=180)
        finally:
            run(["docker", "image", "rm", "-f", lab.image], check=False)
            timings = json.dumps(lab.timings, indent=2)
            (tmp_path / "timings.json").write_text(timings)
            print(f"\nDocker lab timings (s): {timings}")


def timed(lab: DockerLab, what: str, since: float) -> float:
    lab.timings[what] = round(time.monotonic() - since, 1)
    return time.monotonic()


def test_docker_lab_walkthrough(docker_lab: DockerLab) -> None:
    """make lab-docker; lab/README.md's Docker section; make lab-docker-down leaves nothing."""
    lab = docker_lab
    began = mark = time.monotonic()
    made = subprocess.run(
        ["bash", str(LAB / "docker" / "base-image.sh")], capture_output=True, text=True, timeout=900
    )
    base = made.stdout.strip()  # the tag alone; what it did is on stderr
    assert made.returncode == 0 and base.startswith("kumazone-lab-base:"), made.stderr
    mark = timed(lab, "base image", mark)

    # 1. Up: the image built once (from the wheels, with no network), every service up,
    #    and make returns only once both zones hold the global's table.
    output = lab.make("lab-docker", LAB_BASE_IMAGE=base)
    mark = timed(lab, "make lab-docker (wheels, image, up, synced)", mark)
    assert "hold the global's table" in output, output
    containers = lab.containers()
    assert sorted(containers) == [
        "certs",
        "client-1",
        "client-2",
        "global",
        "zone-1",
        "zone-2",
    ], containers
    assert containers["certs"].startswith("Exited (0)"), containers
    for service in ("global", "zone-1", "zone-2"):
        assert containers[service].startswith("Up") and "(healthy)" in containers[service]
    for service in ("client-1", "client-2"):
        assert containers[service].startswith("Up"), containers
    certs = lab.exec("global", "ls", "/certs").split()
    assert {"ca.pem", "global.pem", "zone-1.pem", "zone-2.pem"} <= set(certs), certs

    # 2. A zone-2 service from both zones' clients, forward and reverse, through dnsmasq.
    web = lab.vips("zone-2")["web"]
    for client in ("client-1", "client-2"):
        answers = lab.dig(
            client,
            ["web.mesh"],
            ["web.mesh", "AAAA"],
            ["-x", web["vip"]],
            ["-x", web["vip6"]],
            ["example.com"],
        )
        assert answers == [
            ("NOERROR", [web["vip"]]),
            ("NOERROR", [web["vip6"]]),
            ("NOERROR", ["web.mesh."]),
            ("NOERROR", ["web.mesh."]),
            ("REFUSED", []),  # nothing but the domain and its reverse zones is forwarded
        ], client
    assert lab.vips("zone-1")["web"]["vip"] == web["vip"]
    mark = timed(lab, "walkthrough: names from both clients", mark)

    # 3. The global stopped: the zones keep answering.
    lab.compose("stop", "global")
    for client in ("client-1", "client-2"):
        assert lab.dig(client, ["web.mesh"]) == [("NOERROR", [web["vip"]])], client

    # 4. A service added in zone-2 (through its API) while the global is away.
    lab.api("zone-2", "PUT", "/meshes/default/dataplanes/orders-1", ORDERS)
    orders = lab.vips("zone-2")["orders"]
    assert orders["provisional"] is True
    assert lab.dig("client-2", ["orders.mesh"]) == [("NOERROR", [orders["vip"]])]
    assert lab.dig("client-1", ["orders.mesh"])[0][0] == "NXDOMAIN"

    # 5. The global back: zone-1 learns it, with the VIP zone-2 was serving.
    lab.compose("start", "global")
    synced = run(
        ["bash", str(LAB / "docker" / "lab-docker.sh"), "wait-synced", "60"],
        timeout=90,
        env=lab.env,
    )
    assert "hold the global's table" in synced, synced
    assert lab.dig("client-1", ["orders.mesh"]) == [("NOERROR", [orders["vip"]])]
    assert lab.vips("zone-2")["orders"]["provisional"] is False
    assert lab.vips("zone-1")["orders"]["vip"] == orders["vip"]
    status = run(["bash", str(LAB / "docker" / "lab-docker.sh"), "status"], env=lab.env)
    assert "zone-1 and zone-2 agree on all 9 VIPs" in status, status
    mark = timed(lab, "walkthrough: global stopped and back", mark)

    # 6. Down: nothing of the lab is left.
    lab.make("lab-docker-down", timeout=180)
    timed(lab, "make lab-docker-down", mark)
    assert lab.leftovers() == {}, lab.leftovers()
    lab.timings["total"] = round(time.monotonic() - began, 1)
