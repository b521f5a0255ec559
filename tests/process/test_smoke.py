"""The sample zone answers a query end to end (the README's promise)."""

from tests.kzprocess import ZoneProcess


def test_redis_resolves_with_aa_and_ttl(zone_process) -> None:
    zone: ZoneProcess = zone_process()
    output = zone.dig("redis.mesh")
    assert "status: NOERROR" in output
    assert "flags: qr aa" in output
    answer = [line for line in output.splitlines() if line.startswith("redis.mesh.")]
    assert len(answer) == 1, output
    _name, ttl, klass, rtype, address = answer[0].split()
    assert (ttl, klass, rtype) == ("60", "IN", "A")
    assert address.split(".")[0] in {str(n) for n in range(240, 256)}
