-- Host drains (issue 13, item 5): a drain is an operations row (kind 'host_drain', subject and
-- host the drained host) whose result records its progress (total, done, moved, failed); the
-- process running it holds a session advisory lock, so a 'running' drain whose lock is free
-- is dead (the next drain of the host closes it as failed).
ALTER TABLE operations DROP CONSTRAINT operations_kind;
ALTER TABLE operations ADD CONSTRAINT operations_kind CHECK (kind IN
    ('provision', 'purge', 'archive', 'restore', 'template_build', 'repair', 'template_upgrade',
     'move', 'drop_copy', 'host_drain'));
