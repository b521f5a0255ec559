"""The namespace lab with the global as two replicas on one PostgreSQL server
(``make lab LAB_GLOBAL_REPLICAS=2``), walked through as lab/README.md's "Replicas of
the global" section does: find the leader, kill it, and every zone keeps resolving
and allocating once the other replica leads.

Root and network namespaces as for tests/lab/test_lab.py (``KUMAZONE_LAB=skip`` skips
it where they cannot be had); its own namespace prefix, state directory and dataplane
user; ``make lab`` installs PostgreSQL when missing (``make lab-tools``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.test_lab import (
    BIN,
    CROSS_ZONE,
    DOTTED,
    OUTSIDE,
    Lab,
    lab_running,
    user_exists,
    wait_for,
)

GLOBALS = ("global", "global-2")
STORE = "postgresql://kumazone@198.51.100.230:5432/kumazone"
ZONE_GLOBALS = "--global=198.51.100.201:5685,198.51.100.202:5685"
READY = "http://127.0.0.1:5680/ready"
NOBODY = 65534
ADDED = "orders"
DATAPLANE = {
    "type": "Dataplane",
    "mesh": "default",
    "name": f"{ADDED}-1",
    "networking": {
        "address": "198.51.100.60",
        "inbound": [{"port": 8080, "tags": {"kuma.io/service": ADDED}}],
    },
}
# One HTTP request from inside a namespace: prints the status, then the body.
HTTP = """\
import sys, urllib.error, urllib.request
method, url, body = sys.argv[1], sys.argv[2], sys.argv[3].encode() or None
request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method=method)
try:
    with urllib.request.urlopen(request, timeout=5) as response:
        print(response.status); print(response.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
except OSError as e:
    print(0); print(e)
"""


class ReplicaLab(Lab):
    """The lab with LAB_GLOBAL_REPLICAS=2 given to `make lab` (lab.sh's other commands
    take it from the state, as they are run here without it)."""

    def __init__(self, state: Path, prefix: str) -> None:
        super().__init__(state, prefix)
        self.settings.append("LAB_GLOBAL_REPLICAS=2")

    def namespaces(self) -> list[str]:
        return [*super().namespaces(), self.prefix + "global2", self.prefix + "db"]

    def http(self, host: str, method: str, url: str, body: str = "") -> tuple[int, str]:
        output = self.in_host(host, str(BIN / "python"), "-c", HTTP, method, url, body)
        status, _, text = output.partition("\n")
        return int(status), text

    def ready(self, host: str) -> str:
        """The global's /ready body ("ok: leader", "ok: follower"), or why not."""
        status, text = self.http(host, "GET", READY)
        return text.strip() if status == 200 else f"HTTP {status}: {text.strip()}"

    def leader(self) -> str | None:
        """The one global that says it leads (None while none or both do)."""
        leading = [g for g in GLOBALS if self.ready(g) == "ok: leader"]
        return leading[0] if len(leading) == 1 else None

    def pid(self, name: str) -> int:
        return int((self.state / "run" / f"{name}.pid").read_text())

    def db_pid(self) -> int:
        return int((self.state / "db" / "data" / "postmaster.pid").read_text().split()[0])


@pytest.fixture
def replica_lab(tmp_path: Path) -> Iterator[ReplicaLab]:
    with lab_running(tmp_path, ReplicaLab, "kzr") as started:
        yield started


def test_lab_global_replicas_walkthrough(replica_lab: ReplicaLab) -> None:
    """make lab LAB_GLOBAL_REPLICAS=2; kill the leading global; the zones follow the
    other replica, keep resolving, and allocate a new service through it."""
    lab = replica_lab
    began = time.monotonic()
    user_was_there = user_exists(lab.dp_user)
    output = lab.make("lab")
    assert "hold the global's table" in output, output
    assert re.search(r"\((global|global-2) leads\)", output), output
    lab.record_pids()
    # global, global-2, zone-1, zone-2, the cluster DNS, a dataplane per client.
    assert len(lab.pids) == 7, sorted((lab.state / "run").rglob("*"))
    db = lab.db_pid()
    lab.pids.add(db)

    # 1. What runs: PostgreSQL as nobody in the db host; both globals on it; the
    #    zones given both globals.
    status = Path(f"/proc/{db}/status").read_text()
    assert re.search(rf"^Uid:\s+{NOBODY}\s", status, re.M), status
    db_ns = subprocess.run(
        ["ip", "netns", "identify", str(db)], capture_output=True, text=True
    ).stdout.strip()
    assert db_ns == lab.namespace("db")
    for name in GLOBALS:
        command = Path(f"/proc/{lab.pid(name)}/cmdline").read_bytes().split(b"\0")
        assert f"--store={STORE}".encode() in command, command
    for zone in ("zone-1", "zone-2"):
        command = Path(f"/proc/{lab.pid(zone)}/cmdline").read_bytes().split(b"\0")
        assert ZONE_GLOBALS.encode() in command, command
    topology = json.loads((lab.state / "lab.json").read_text())
    assert topology["hosts"]["db"]["ipv4"] == "198.51.100.230"
    assert topology["hosts"]["global-2"]["role"] == "global"

    # 2. One leads, the other stands by: its API is the leader's, forwarded.
    leader = wait_for("one global leads", lab.leader, 10)
    standby = next(g for g in GLOBALS if g != leader)
    assert lab.ready(standby) == "ok: follower"
    api = {g: topology["hosts"][g]["api"] for g in GLOBALS}
    leaders_vips = lab.http(leader, "GET", api[leader] + "/vips")
    assert leaders_vips[0] == 200
    assert lab.http(standby, "GET", api[standby] + "/vips") == leaders_vips
    status_text = lab.make("lab-status")
    roles = {leader: "leader", standby: "follower"}
    assert re.search(rf"^role\s+{roles['global']}\s+{roles['global-2']}$", status_text, re.M), (
        status_text
    )
    vips = lab.vips("zone-2")
    web = vips[CROSS_ZONE]
    for client in ("client-1", "client-2"):
        assert lab.dig(client, f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]]), client
    before = {zone: lab.vips(zone) for zone in ("zone-1", "zone-2")}

    # 3. The leader is killed: the other replica leads within seconds, the zones
    #    reconnect to it and hold its table, every VIP as it was; the clients answer
    #    all along.
    killed_at = time.monotonic()
    os.kill(lab.pid(leader), 9)
    for client in ("client-1", "client-2"):
        assert lab.dig(client, f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]]), client
    wait_for(f"{standby} leads", lambda: True if lab.ready(standby) == "ok: leader" else None, 10)
    took_over = time.monotonic() - killed_at
    synced = lab.lab_sh("wait-synced", "30")
    assert f"({standby} leads)" in synced, synced
    reconnected = time.monotonic() - killed_at
    for zone in ("zone-1", "zone-2"):
        after = lab.vips(zone)
        assert {s: i["vip"] for s, i in after.items()} == {
            s: i["vip"] for s, i in before[zone].items()
        }, zone
    for client in ("client-1", "client-2"):
        assert lab.dig(client, f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]]), client
        assert lab.dig(client, DOTTED[1]) == ("NOERROR", [vips[DOTTED[0]]["vip"]]), client
        assert lab.dig(client, OUTSIDE[0]) == ("NOERROR", [OUTSIDE[1]]), client
    status_text = lab.make("lab-status")
    roles = {leader: "down", standby: "leader"}
    assert re.search(rf"^role\s+{roles['global']}\s+{roles['global-2']}$", status_text, re.M), (
        status_text
    )
    assert "zone-1 and zone-2 agree on all" in status_text, status_text

    # 4. A Dataplane PUT to zone-1's API: zone-2's client resolves the new service,
    #    placed by the new leader.
    code, body = lab.http(
        "zone-1",
        "PUT",
        f"{topology['hosts']['zone-1']['api']}/meshes/default/dataplanes/{ADDED}-1",
        json.dumps(DATAPLANE),
    )
    assert code in (200, 201), (code, body)
    put_at = time.monotonic()
    answer = wait_for(
        "client-2 resolves the service added through zone-1's API",
        lambda: lab.dig("client-2", f"{ADDED}.mesh")[1] or None,
        15,
        every=0.1,
    )
    allocated = time.monotonic() - put_at
    lab.lab_sh("wait-synced", "30")
    added = lab.vips("zone-1")[ADDED]
    assert not added["provisional"] and answer == [added["vip"]]
    assert lab.vips("zone-2")[ADDED]["vip"] == added["vip"]
    assert lab.dig("client-1", f"{ADDED}.mesh") == ("NOERROR", [added["vip"]])

    # 5. lab.sh start brings the killed one back as a follower; lab.sh stop of the
    #    leader hands the lead back; the zones follow again, the VIPs stay.
    lab.lab_sh("start", leader)
    lab.record_pids()
    assert lab.ready(leader) == "ok: follower"
    lab.lab_sh("stop", standby)
    assert not (lab.state / "run" / f"{standby}.pid").exists()
    wait_for(f"{leader} leads again", lambda: True if lab.leader() == leader else None, 10)
    synced = lab.lab_sh("wait-synced", "30")
    assert f"({leader} leads)" in synced, synced
    assert lab.dig("client-2", f"{ADDED}.mesh") == ("NOERROR", [added["vip"]])
    assert lab.dig("client-1", f"{CROSS_ZONE}.mesh") == ("NOERROR", [web["vip"]])
    lab.lab_sh("start", standby)
    lab.record_pids()
    assert lab.ready(standby) == "ok: follower"

    # 6. lab.sh down (which takes the replicas from the state) leaves nothing: no
    #    namespace, no process (PostgreSQL's too), no database.
    lab.lab_sh("down")
    lab.make("lab-down")
    lab.assert_nothing_left(user_was_there)
    assert not (lab.state / "db").exists()
    print(
        f"took over {took_over:.1f}s after the kill, zones synced {reconnected:.1f}s after, "
        f"new service resolved in zone-2 {allocated:.1f}s after its PUT"
    )
    assert took_over < 5 and reconnected < 20
    assert time.monotonic() - began < 150
