-- What a build's successor needs to compute the upgrade step from it (issue 12): the JSON
-- Schemas the build compiled (schema name -> document) and its migration manifest
-- ([{number, name, sha256}] of every file it applied). NULL on builds made before this migration:
-- no step is computed from those.
ALTER TABLE template_builds
    ADD COLUMN compiled_schemas   jsonb,
    ADD COLUMN migration_manifest jsonb,
    ADD CONSTRAINT template_builds_compiled_schemas CHECK (jsonb_typeof(compiled_schemas) = 'object'),
    ADD CONSTRAINT template_builds_migration_manifest CHECK (jsonb_typeof(migration_manifest) = 'array');
