-- kumazone store on PostgreSQL: schema version 1 to 2, the leader of each set of replicas.
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
UPDATE meta SET value = '2' WHERE key = 'schema_version';
