-- kumazone store, schema version 1.
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
    vip_offset INTEGER NOT NULL UNIQUE,
    PRIMARY KEY (mesh, service)
);
-- Released VIPs in hold-down, not to be handed to another service before `until`.
CREATE TABLE holds (
    vip_offset INTEGER PRIMARY KEY,
    mesh TEXT NOT NULL,
    service TEXT NOT NULL,
    until REAL NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('schema_version', '1');
INSERT INTO meta (key, value) VALUES ('table_version', '0');
INSERT INTO meta (key, value) VALUES ('vip_range', '');
