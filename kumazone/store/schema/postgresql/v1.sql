-- kumazone store on PostgreSQL, schema version 1: SQLite's schema v3, table for table.
-- A new database is created at version 1 and migrated: migrate-v1-v2.sql and so on.
CREATE TABLE resources (
    type TEXT NOT NULL,
    mesh TEXT NOT NULL,
    name TEXT NOT NULL,
    document TEXT NOT NULL,
    PRIMARY KEY (type, mesh, name)
);
-- One row per allocated VIP; UNIQUE(vip_offset) makes a VIP on two services impossible.
CREATE TABLE vips (
    mesh TEXT NOT NULL,
    service TEXT NOT NULL,
    vip_offset BIGINT NOT NULL UNIQUE,
    zones TEXT NOT NULL DEFAULT '[]',
    -- The table version at which the row was first allocated: who holds a shared name.
    claim BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (mesh, service)
);
-- Released VIPs in hold-down, not to be handed to another service before `until`.
CREATE TABLE holds (
    vip_offset BIGINT PRIMARY KEY,
    mesh TEXT NOT NULL,
    service TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
-- The global's record of each zone (a hello or a disconnect writes one row of it).
CREATE TABLE zones (
    name TEXT PRIMARY KEY,
    last_contact DOUBLE PRECISION NOT NULL,
    acked BIGINT NOT NULL
);
-- Each zone's services, one row each.
CREATE TABLE zone_services (
    zone TEXT NOT NULL,
    mesh TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (zone, mesh, service)
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('schema_version', '1');
INSERT INTO meta (key, value) VALUES ('table_version', '0');
INSERT INTO meta (key, value) VALUES ('vip_range', '');
-- Which table the rows are: '' when allocated here, else the global's table id.
INSERT INTO meta (key, value) VALUES ('table_origin', '');
