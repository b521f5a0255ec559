"""Replicas of a zone synced with a global: only the leader syncs, every one serves the table.

A global, and zone-1 as two `twistd kumazone --role=zone --global=...
--store=postgresql://...` processes on the session's PostgreSQL server (zone-2
is one process on SQLite), over mutual TLS.  The leader of zone-1 connects to
the global; its follower does not, and serves the global's table as the leader
stored it, and the provisional VIPs the leader serves while the global is away.
Killed, the leader is replaced within the bound; the new one connects and no
VIP moves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.builders import dataplane
from tests.fedprocess import (
    GlobalProcess,
    ProcessGroup,
    answer,
    free_port,
    make_certs,
    parse_metrics,
    start_zone,
    wait_until,
)
from tests.kzprocess import ZoneProcess
from tests.process.test_global_replicas import killed_and_replaced, role


def put(zone: ZoneProcess, service: str, address: str) -> int:
    document = dataplane(f"{service}-1", service, address=address)
    return zone.api("PUT", f"/meshes/default/dataplanes/{service}-1", document)[0]


def served(zones: list[ZoneProcess], services: list[str], provisional: bool = False) -> dict:
    """service -> VIP, once every zone given serves each of C{services} alike (over DNS
    and /vips); with C{provisional}, as provisional VIPs (the global has not placed them)."""

    def agreed() -> dict[str, str] | None:
        found = []
        for zone in zones:
            answers = {s: answer(zone, s) for s in services}
            listed = {i["service"]: i for i in zone.vips()["items"]}
            if any(v is None or listed.get(s, {}).get("vip") != v for s, v in answers.items()):
                return None
            if any(listed[s].get("provisional", False) != provisional for s in services):
                return None
            found.append(answers)
        return found[0] if all(f == found[0] for f in found) else None

    table = wait_until(agreed, 30, 0.1, f"{services} served alike")
    assert table is not None
    assert len(set(table.values())) == len(table), "a VIP on two services"
    return table


def zone_replicas(tmp_path: Path, url: str, address: str, certs: Path, group: ProcessGroup):
    return [
        start_zone(tmp_path, "zone-1", address, certs, args=[f"--store={url}"], group=group)
        for _ in range(2)
    ]


def leader_of(replicas: list[ZoneProcess]) -> ZoneProcess:
    found = wait_until(
        lambda: next((r for r in replicas if role(r) == "leader"), None), 15, 0.05, "a leader"
    )
    assert found is not None
    return found


def syncing(replica: ZoneProcess) -> bool:
    """Whether the replica has a connection to the global, and the global welcomed it."""
    sync = replica.api("GET", "/")[1]["sync"]
    return bool(sync["syncing"] and sync["connected"])


def sync_connected(replica: ZoneProcess) -> float | None:
    """The replica's own gauge of its connection to the global."""
    text = replica.http("diagnostics", "GET", "/metrics")[1].decode()
    return parse_metrics(text).get("kumazone_sync_connected", zone="zone-1")


def test_only_the_leader_syncs_and_the_follower_serves_the_globals_table(
    tmp_path: Path, group: ProcessGroup, postgres: Any
) -> None:
    url = postgres.fresh_database("federated_zone_replicas")
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], ["zone-1", "zone-2"])
    global_ = group.add(GlobalProcess(tmp_path, certs)).start()
    replicas = zone_replicas(tmp_path, url, global_.address, certs, group)
    other = start_zone(tmp_path, "zone-2", global_.address, certs, group=group)
    leader = leader_of(replicas)
    (follower,) = [r for r in replicas if r is not leader]
    wait_until(lambda: global_.zones()["zone-1"]["state"] == "online", 15, 0.1, "zone-1 online")
    wait_until(lambda: syncing(leader), 15, 0.1, "the leader syncs")
    assert not syncing(follower)
    assert role(follower) == "follower"
    assert sync_connected(leader) == 1
    assert sync_connected(follower) == 0  # the follower never connected
    assert "connected to the global" not in follower.log_path.read_text()

    # A write on the follower goes through the store; the leader sends it to the global.
    assert put(follower, "web", "10.6.0.1") == 201
    assert put(other, "db", "10.6.0.2") == 201
    table = served([*replicas, other], ["web", "db"])
    assert global_.zones()["zone-1"]["services"] == 1

    # The leader killed: the follower leads, syncs, and no VIP moves.
    killed_and_replaced(leader, follower)
    wait_until(lambda: syncing(follower), 15, 0.1, "the new leader syncs")
    assert sync_connected(follower) == 1
    assert put(follower, "cache", "10.6.0.3") == 201
    after = served([follower, other], ["web", "db", "cache"])
    assert {s: after[s] for s in table} == table, "a VIP moved"
    assert global_.zones()["zone-1"]["services"] == 2


def test_with_the_global_away_both_replicas_serve_the_leaders_provisional_vips(
    tmp_path: Path, group: ProcessGroup, postgres: Any
) -> None:
    url = postgres.fresh_database("federated_zone_provisional")
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], ["zone-1"])
    global_ = group.add(GlobalProcess(tmp_path, certs, kds_port=free_port()))
    replicas = zone_replicas(tmp_path, url, global_.address, certs, group)
    leader = leader_of(replicas)
    (follower,) = [r for r in replicas if r is not leader]
    assert put(follower, "web", "10.6.0.1") == 201
    assert put(leader, "api", "10.6.0.2") == 201
    provisional = served(replicas, ["web", "api"], provisional=True)
    # The global comes: it confirms what the zone has, and nothing moves.
    global_.start()
    confirmed = served(replicas, ["web", "api"])
    assert confirmed == provisional
