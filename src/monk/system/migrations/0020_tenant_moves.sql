-- Tenant moves between hosts (issue 13, item 5). A move is an operations row (kind 'move',
-- subject the tenant's name key, host the source) whose step is its journal: prepared, frozen,
-- copied, verified, then 'switched' committed in the very transaction that changes
-- tenants.host, so the row says which host holds the authoritative copy after a crash. The
-- copy left behind is dropped by a queued 'drop_copy' job (host: where it lies), queued in
-- that same transaction and worked like the purge queue (claimed FOR UPDATE SKIP LOCKED,
-- retried with backoff). The process running a move holds the tenant's advisory lock: a
-- 'running' move whose lock is free is dead, and 'monk doctor --repair' or the next move of
-- the tenant finishes it (switched) or undoes it (not switched).
ALTER TABLE operations DROP CONSTRAINT operations_kind;
ALTER TABLE operations ADD CONSTRAINT operations_kind CHECK (kind IN
    ('provision', 'purge', 'archive', 'restore', 'template_build', 'repair', 'template_upgrade',
     'move', 'drop_copy'));
