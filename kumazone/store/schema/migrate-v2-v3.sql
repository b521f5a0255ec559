-- kumazone store: schema version 2 to 3, run in one transaction at open.
-- A zone's services move from a JSON list in its record to one row each.
CREATE TABLE zone_services (
    zone TEXT NOT NULL,
    mesh TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (zone, mesh, service)
) WITHOUT ROWID;
INSERT OR IGNORE INTO zone_services (zone, mesh, service)
    SELECT zones.name, json_extract(item.value, '$[0]'), json_extract(item.value, '$[1]')
    FROM zones, json_each(zones.services) AS item;
CREATE TABLE zones_v3 (
    name TEXT PRIMARY KEY,
    last_contact REAL NOT NULL,
    acked INTEGER NOT NULL
);
INSERT INTO zones_v3 (name, last_contact, acked) SELECT name, last_contact, acked FROM zones;
DROP TABLE zones;
ALTER TABLE zones_v3 RENAME TO zones;
UPDATE meta SET value = '3' WHERE key = 'schema_version';
