-- The one direct thread between two users: `direct_key` is the pair in a
-- canonical order ("<smaller uuid>:<larger uuid>"), unique, so concurrent
-- GetOrCreateDirectThread calls converge on one row through INSERT ... ON CONFLICT
-- instead of a check-then-insert race. Group threads have no key.
--
-- squawk: this ships in the same release as 0001, before any thread row exists,
-- so building the unique index and validating the check under the table lock
-- costs nothing; later migrations on populated tables use CONCURRENTLY / NOT VALID.

-- migrate:up

ALTER TABLE threads ADD COLUMN direct_key text;
-- squawk-ignore disallowed-unique-constraint, constraint-missing-not-valid
ALTER TABLE threads ADD CONSTRAINT uq_threads_direct_key UNIQUE (direct_key);
-- squawk-ignore constraint-missing-not-valid
ALTER TABLE threads ADD CONSTRAINT ck_threads_direct_key
    CHECK (is_direct = (direct_key IS NOT NULL));
ALTER TABLE archived_threads ADD COLUMN direct_key text;

-- migrate:down

-- squawk-ignore ban-drop-column
ALTER TABLE archived_threads DROP COLUMN direct_key;
-- squawk-ignore ban-drop-constraint
ALTER TABLE threads DROP CONSTRAINT ck_threads_direct_key;
-- squawk-ignore ban-drop-constraint
ALTER TABLE threads DROP CONSTRAINT uq_threads_direct_key;
-- squawk-ignore ban-drop-column
ALTER TABLE threads DROP COLUMN direct_key;
