-- ListReplies reads one parent's replies in (created_at, id) order, a page at a
-- time after a keyset position. idx_messages_parent (parent_id) found them but
-- not in order: every page fetched and sorted all of a parent's replies (63 ms a
-- page at 300k replies). This index is in page order, so a page is one range
-- scan that stops after page_size rows, at any depth. Partial: most messages are
-- not replies. Built CONCURRENTLY so sends go on.
-- migrate:no-transaction

-- migrate:up

CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_messages_replies
    ON messages (parent_id, created_at, id) WHERE parent_id IS NOT NULL;

-- migrate:down

DROP INDEX CONCURRENTLY IF EXISTS idx_messages_replies;
