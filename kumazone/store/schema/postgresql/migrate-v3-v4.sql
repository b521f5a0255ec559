-- kumazone store on PostgreSQL: schema version 3 to 4, where to reach the leader.
-- The leader writes how the other replicas reach it (JSON: zone sync and API
-- addresses) when it takes the lead; a replica standing by forwards zone sync and
-- the API there.
ALTER TABLE leader ADD COLUMN contact TEXT NOT NULL DEFAULT '';
UPDATE meta SET value = '4' WHERE key = 'schema_version';
