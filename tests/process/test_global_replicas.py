"""Replicas of the global on a real PostgreSQL: the leader killed, zones carry on with the other.

Two `twistd kumazone --role=global --store=postgresql://...` processes on the
session's PostgreSQL server and two zones, over mutual TLS: zone-1 given both
replicas (`--global=A,B`), zone-2 only the one standing by.  The leader takes
zone sync; the other forwards its zone sync port and its API to the leader.
Killed with SIGKILL, the leader is replaced within the bound, the zones
reconnect to the new one, every VIP stays where it was, and a new service
placed afterwards resolves in both zones.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from tests.builders import dataplane
from tests.fedprocess import (
    GlobalProcess,
    ProcessGroup,
    answer,
    free_port,
    make_certs,
    start_zone,
    wait_until,
    write_service,
)
from tests.kzprocess import ZoneProcess

FAILOVER = 5.0


def role(process: Any) -> str:
    try:
        status, body = process.http("diagnostics", "GET", "/ready")
    except OSError:
        return "down"
    return body.decode().strip().removeprefix("ok: ") if status == 200 else "down"


def served_alike(zones: list[ZoneProcess], services: list[str]) -> dict[str, str]:
    def agreed() -> dict[str, str] | None:
        found = [{s: answer(z, s) for s in services} for z in zones]
        if any(v is None for f in found for v in f.values()):
            return None
        return found[0] if all(f == found[0] for f in found) else None

    table = wait_until(agreed, 30, 0.1, f"both zones serve {services} alike")
    assert table is not None
    assert len(set(table.values())) == len(table), "a VIP on two services"
    return table


def start_replicas(
    tmp_path: Path, certs: Path, url: str, group: ProcessGroup
) -> list[GlobalProcess]:
    """Two replicas of the global on the store at C{url}, started (global-a, global-b)."""
    made = [
        group.add(
            GlobalProcess(
                tmp_path,
                certs,
                [f"--store={url}", "--advertise-address=127.0.0.1"],
                kds_port=free_port(),
                name=f"global-{n}",
            )
        )
        for n in "ab"
    ]
    for process in made:
        process.start()
    return made


def killed_and_replaced(leader: Any, other: Any) -> float:
    """SIGKILL C{leader}; the seconds until C{other} says it leads (within the bound)."""
    assert leader.process is not None
    killed = time.monotonic()
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait(10)
    wait_until(lambda: role(other) == "leader", FAILOVER + 5, 0.05, "the other leads")
    taken = time.monotonic() - killed
    assert taken < FAILOVER, f"took {taken:.1f} s"
    return taken


def test_the_global_leader_killed_the_other_leads_and_no_vip_moves(
    tmp_path: Path, group: ProcessGroup, postgres: Any
) -> None:
    url = postgres.fresh_database("global_replicas")
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], ["zone-1", "zone-2"])
    globals_ = start_replicas(tmp_path, certs, url, group)
    leader = wait_until(
        lambda: next((g for g in globals_ if role(g) == "leader"), None), 15, 0.05, "a leader"
    )
    (standby,) = [g for g in globals_ if g is not leader]
    assert role(standby) == "follower"
    # zone-1 is given both replicas; zone-2 only the one standing by, which forwards
    # its zone sync to the leader (TLS is between zone-2 and the leader).
    zones = [
        start_zone(
            tmp_path,
            name,
            addresses,
            certs,
            resources=write_service(tmp_path / f"resources-{name}", service, address),
            group=group,
        )
        for name, service, address, addresses in (
            ("zone-1", "web", "10.5.0.1", ",".join(g.address for g in globals_)),
            ("zone-2", "db", "10.5.0.2", standby.address),
        )
    ]
    before = served_alike(zones, ["web", "db"])
    # The leader has both zones; the API on the one standing by is the leader's.
    wait_until(lambda: all(z["state"] == "online" for z in leader.zones().values()), 15)
    assert set(leader.zones()) == {"zone-1", "zone-2"}
    assert standby.zones() == leader.zones()
    assert standby.http("api", "GET", "/vips")[1] == leader.http("api", "GET", "/vips")[1]
    killed_and_replaced(leader, standby)
    # The zones reconnect to it; a new service is placed and reaches the other zone.
    document = dataplane("cache-1", "cache", address="10.5.0.3")
    wait_until(
        lambda: (
            zones[0].api("PUT", "/meshes/default/dataplanes/cache-1", document)[0] in (200, 201)
        ),
        10,
        0.2,
    )
    table = served_alike(zones, ["web", "db", "cache"])
    assert {s: table[s] for s in before} == before, "a VIP moved"
    assert set(standby.zones()) == {"zone-1", "zone-2"}
    _, about = zones[1].api("GET", "/")
    assert about["sync"]["global"] == standby.address


def test_a_paused_global_leader_is_replaced_and_stands_by_when_it_resumes(
    tmp_path: Path, group: ProcessGroup, postgres: Any
) -> None:
    url = postgres.fresh_database("global_replicas_paused")
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], ["zone-1"])
    globals_ = start_replicas(tmp_path, certs, url, group)
    zone = start_zone(
        tmp_path,
        "zone-1",
        ",".join(g.address for g in globals_),
        certs,
        resources=write_service(tmp_path / "resources", "web", "10.6.0.1"),
        group=group,
    )
    leader = wait_until(
        lambda: next((g for g in globals_ if role(g) == "leader"), None), 15, 0.05, "a leader"
    )
    (other,) = [g for g in globals_ if g is not leader]
    before = served_alike([zone], ["web"])
    assert leader.process is not None
    paused = time.monotonic()
    leader.process.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: role(other) == "leader", FAILOVER + 5, 0.05, "the other leads")
        taken = time.monotonic() - paused
        assert answer(zone, "web") == before["web"]  # the zone serves its stored table meanwhile
    finally:
        leader.process.send_signal(signal.SIGCONT)
    assert taken < FAILOVER, f"took {taken:.1f} s"
    # Resumed, it finds it no longer leads, closes zone sync, and the zone moves over.
    wait_until(lambda: role(leader) == "follower", 10, 0.1, "the resumed leader stands by")
    wait_until(lambda: other.zones().get("zone-1", {}).get("state") == "online", 30, 0.1)
    document = dataplane("cache-1", "cache", address="10.6.0.2")
    assert zone.api("PUT", "/meshes/default/dataplanes/cache-1", document)[0] in (200, 201)
    table = served_alike([zone], ["web", "cache"])
    assert table["web"] == before["web"]
    # SIGTERM ends both replicas, leader and follower, at once (twistd exits by the
    # signal it was stopped by: -15) and before the 15 s after which stop() kills.
    for process in globals_:
        started = time.monotonic()
        assert process.stop() in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
