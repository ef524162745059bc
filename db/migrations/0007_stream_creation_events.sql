-- A thread's stream delivers every message's creation at its own position (seq)
-- and its latest change at change_seq (migration 0004). Replaying from a cursor
-- walks both: idx_messages_thread_seq for creations, and the partial
-- idx_messages_thread_edits for changes, which holds only messages changed
-- since they were created, so that walk never steps over unedited messages.
-- Built CONCURRENTLY so sends go on.
-- migrate:no-transaction

-- migrate:up

CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS idx_messages_thread_seq
    ON messages (thread_id, seq);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_messages_thread_edits
    ON messages (thread_id, change_seq) WHERE change_seq <> seq;

-- migrate:down

DROP INDEX CONCURRENTLY IF EXISTS idx_messages_thread_edits;
DROP INDEX CONCURRENTLY IF EXISTS idx_messages_thread_seq;
