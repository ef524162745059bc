-- ListUsers' case-insensitive prefix search covers username, email, first and
-- last name. Username and email are served by idx_users_username / idx_users_email
-- (0001); these two serve the names. text_pattern_ops: byte-wise range scans for
-- prefixes under any collation.

-- migrate:up

CREATE INDEX idx_users_first_name ON users (lower(first_name) text_pattern_ops);
CREATE INDEX idx_users_last_name ON users (lower(last_name) text_pattern_ops);

-- migrate:down

DROP INDEX idx_users_last_name;
DROP INDEX idx_users_first_name;
