-- Whether each host's data directory keeps its files in memory (tmpfs, ramfs), as monk last
-- detected it with the host's file cloning: there FILE_COPY's checkpoints flush nothing to a
-- device, so every clone uses FILE_COPY (no WAL, and the template's relcache init file comes
-- along). NULL: detected before this column existed (detected again at the next start).
ALTER TABLE hosts ADD COLUMN clone_in_memory boolean;
