"""A zone given the global's replicas (--global=A,B) syncs with whichever can be reached.

Real processes over mutual TLS: two globals on their own stores (the failover
of the connection is what is tested here; replicas sharing a table are issue
14's), one zone.  A is down when the zone starts: the zone syncs with B within
one attempt.  Then B stops and A starts: the zone follows to A and serves A's
table.
"""

from __future__ import annotations

from pathlib import Path

from tests.fedprocess import (
    GlobalProcess,
    ProcessGroup,
    free_port,
    make_certs,
    start_zone,
    wait_until,
    write_service,
)


def test_a_zone_fails_over_between_the_replicas_of_the_global(
    tmp_path: Path, group: ProcessGroup
) -> None:
    certs = make_certs(tmp_path / "certs", ["localhost", "127.0.0.1"], ["zone-1"])
    a = GlobalProcess(tmp_path, certs, kds_port=free_port(), name="global-a")
    b = group.add(GlobalProcess(tmp_path, certs, name="global-b")).start()
    group.add(a)
    zone = start_zone(
        tmp_path,
        "zone-1",
        f"{a.address},{b.address}",
        certs,
        resources=write_service(tmp_path / "resources", "web", "10.9.0.1"),
        group=group,
    )

    def synced_with(address: str) -> bool:
        _, about = zone.api("GET", "/")
        sync = about["sync"]
        return bool(sync["connected"] and sync["global"] == address and sync["lastTable"])

    wait_until(lambda: synced_with(b.address), 20, what="zone-1 synced with global-b")
    _, about = zone.api("GET", "/")
    assert about["sync"]["globals"] == [a.address, b.address]
    assert "zone-1" in b.zones()
    assert zone.query("web.mesh").answer  # B's table is served

    b.stop()
    a.start()
    wait_until(lambda: synced_with(a.address), 30, what="zone-1 synced with global-a")
    assert "zone-1" in a.zones()
    wait_until(lambda: zone.query("web.mesh").answer, 10, what="web.mesh from A's table")
    # Each time, the zone says where it went and why (B refused after it stopped).
    log = zone.log_path.read_text()
    assert f"connected to {b.address} (after {a.address}:" in log
    assert f"connected to {a.address} (after {b.address}:" in log
