-- ListUsers' case-insensitive prefix search covers username, email, first and
-- last name. Username and email are served by idx_users_username / idx_users_email
-- (0001); these two serve the names. text_pattern_ops: byte-wise range scans for
-- prefixes under any collation. Built CONCURRENTLY so writes to users go on.
-- migrate:no-transaction

-- migrate:up

CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_users_first_name
    ON users (lower(first_name) text_pattern_ops);
CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_users_last_name
    ON users (lower(last_name) text_pattern_ops);

-- migrate:down

DROP INDEX CONCURRENTLY IF EXISTS idx_users_last_name;
DROP INDEX CONCURRENTLY IF EXISTS idx_users_first_name;
