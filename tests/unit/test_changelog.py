"""kumazone.store.changelog: a store change as text and back, whole, and bad text refused."""

from __future__ import annotations

import pytest

from kumazone.core.federation import ZoneRecord
from kumazone.core.resources import DATAPLANE, ResourceKey, parse_resource
from kumazone.core.storage import StoreChanges
from kumazone.core.vips import Allocation, Hold, ServiceKey, TableDelta
from kumazone.store.changelog import decode, encode
from tests.builders import dataplane_resource, external_service

WEB = ServiceKey("default", "web")
DB = ServiceKey("payments", "db")


def zones(changes: StoreChanges) -> list[tuple[str, float, int]]:
    return [(z.name, z.last_contact, z.acked) for z in changes.zones_put]


def test_every_field_round_trips() -> None:
    changes = StoreChanges(
        puts=(dataplane_resource("web-1", "web"), parse_resource(external_service("httpbin"))),
        deletes=(ResourceKey(DATAPLANE, "default", "old"),),
        delta=TableDelta(
            added=[Allocation(WEB, 7, ("zone-1", "zone-2"), 3), Allocation(DB, 2)],
            removed=[Allocation(ServiceKey("default", "gone"), 9)],
            holds_added=[Hold(ServiceKey("default", "gone"), 9, 1234.5)],
            holds_dropped=[Hold(DB, 2, 99.0)],
            exhausted=[ServiceKey("default", "waiting")],
        ),
        table_version=42,
        vip_range="240.0.0.0/4 fd00:fd00::/64",
        reset_table=True,
        table_id="abc",
        zones_put=(ZoneRecord("zone-1", last_contact=5.5, acked=41),),
        zones_deleted=("zone-9",),
        zone_services_added=(("zone-1", WEB),),
        zone_services_removed=(("zone-2", DB),),
    )
    back = decode(encode(changes))
    assert [r.document for r in back.puts] == [r.document for r in changes.puts]
    assert back.puts[0].services == ("web",)
    assert back.deletes == changes.deletes
    assert back.delta == changes.delta
    assert (back.table_version, back.vip_range, back.reset_table, back.table_id) == (
        42,
        "240.0.0.0/4 fd00:fd00::/64",
        True,
        "abc",
    )
    assert zones(back) == [("zone-1", 5.5, 41)]
    assert back.zones_deleted == ("zone-9",)
    assert back.zone_services_added == (("zone-1", WEB),)
    assert back.zone_services_removed == (("zone-2", DB),)


def test_an_empty_change_is_short_and_round_trips_to_the_defaults() -> None:
    text = encode(StoreChanges())
    assert text == '{"v":1}'
    assert decode(text) == StoreChanges()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"v": 2}',
        '{"v": 1, "delta": {"added": [["default"]]}}',
        '{"v": 1, "delta": {"added": [[1, 2, 3, [], 0]], "removed": [], '
        '"holds_added": [], "holds_dropped": []}}',
        '{"v": 1, "puts": ["{not json"]}',
        '{"v": 1, "puts": ["{\\"type\\": \\"Dataplane\\", \\"name\\": \\"x\\"}"]}',
        '{"v": 1, "deletes": [["Dataplane", "default"]]}',
        '{"v": 1, "table_version": "x"}',
    ],
)
def test_bad_text_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)
