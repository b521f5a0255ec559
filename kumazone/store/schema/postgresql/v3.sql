-- kumazone store on PostgreSQL, schema version 3: SQLite's schema v3, table for table,
-- the leader of each set of replicas, and the change log they follow.
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
-- One row per role and zone name ('global', 'zone:NAME'): who leads, under which epoch.
-- A leader renews `renewed_at` on the session that holds the advisory lock; the others
-- may end that session once the lease ran out, and every leader write checks its epoch.
CREATE TABLE leader (
    name TEXT PRIMARY KEY,
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    pid INTEGER NOT NULL,
    renewed_at TIMESTAMPTZ NOT NULL
);
-- Every transaction appends the change it wrote under the next `log_seq` (taken from
-- meta under its row lock, so sequence order is commit order) and notifies
-- `kumazone_changes`; the other replicas read the rows after the last one they applied.
CREATE TABLE changes (
    seq BIGINT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('schema_version', '3');
INSERT INTO meta (key, value) VALUES ('log_seq', '0');
INSERT INTO meta (key, value) VALUES ('table_version', '0');
INSERT INTO meta (key, value) VALUES ('vip_range', '');
-- Which table the rows are: '' when allocated here, else the global's table id.
INSERT INTO meta (key, value) VALUES ('table_origin', '');
