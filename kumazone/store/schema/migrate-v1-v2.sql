-- kumazone store: schema version 1 to 2, run in one transaction at open.
-- Rows of v1 get claim 0: ties are broken by mesh and service, as v1 decided names.
ALTER TABLE vips ADD COLUMN claim INTEGER NOT NULL DEFAULT 0;
UPDATE meta SET value = '2' WHERE key = 'schema_version';
