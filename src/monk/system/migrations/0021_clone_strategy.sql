-- How tenant databases are cloned (issue 16): whether each host's data directory can clone
-- files (PostgreSQL 18's file_copy_method = clone on a reflink filesystem), as monk last
-- detected it, and the clone_strategy a template's build asks for (template.json).
ALTER TABLE hosts
    ADD COLUMN clone_support     boolean,
    ADD COLUMN clone_detail      text,
    ADD COLUMN clone_checked_at  timestamptz;
ALTER TABLE template_builds
    ADD COLUMN clone_strategy    text CHECK (clone_strategy IN ('auto', 'wal_log', 'file_copy'));
