-- kumazone store on PostgreSQL: schema version 2 to 3, the change log replicas follow.
-- Every transaction appends the change it wrote under the next `log_seq` (taken from
-- meta under its row lock, so sequence order is commit order) and notifies
-- `kumazone_changes`; the other replicas read the rows after the last one they applied.
CREATE TABLE changes (
    seq BIGINT PRIMARY KEY,
    body TEXT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('log_seq', '0');
UPDATE meta SET value = '3' WHERE key = 'schema_version';
