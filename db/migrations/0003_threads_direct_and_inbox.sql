-- The one direct thread between two users: `direct_key` is the pair in a
-- canonical order ("<smaller uuid>:<larger uuid>"), unique, so concurrent
-- GetOrCreateDirectThread calls converge on one row through INSERT ... ON CONFLICT
-- instead of a check-then-insert race. Group threads have no key.
--
-- squawk: this ships in the same release as 0001, before any thread row exists,
-- so building the unique index and validating the check under the table lock
-- costs nothing; later migrations on populated tables use CONCURRENTLY / NOT VALID.
--
-- Amended (issue 14) so that `down` then `up` works on populated tables:
-- * the up part gives existing direct threads their key before the constraints:
--   the pair of their two participants; a thread whose pair cannot be told (a
--   participant was deleted) or whose pair already has an older direct thread
--   gets its own id as key (unique, and never a pair, so it blocks nobody).
--   Archived threads keep no key here; restore rebuilds it (db/archive.py).
-- * the down part refuses to drop a key that the up part would not rebuild
--   exactly (live keys not equal to their participants' pair, every archived
--   key), unless run with --allow-data-loss.
-- The schema built is unchanged, so a database that applied the earlier text
-- (checksum below) accepts this one (db/README.md, "Amending an applied migration").
-- migrate:supersedes e6eb76df2e902db368b52a4a49745662cd4e022331c5ef2e59184f6d5ddd5d58

-- migrate:up

ALTER TABLE threads ADD COLUMN direct_key text;
UPDATE threads t
SET direct_key = CASE WHEN k.pair IS NOT NULL AND k.rank = 1 THEN k.pair ELSE t.id::text END
FROM (
    SELECT d.id, p.pair,
           row_number() OVER (PARTITION BY p.pair ORDER BY d.created_at, d.id) AS rank
    FROM threads d
    LEFT JOIN LATERAL (
        SELECT min(tp.user_id::text COLLATE "C") || ':' || max(tp.user_id::text COLLATE "C")
            AS pair
        FROM thread_participants tp WHERE tp.thread_id = d.id
        HAVING count(*) = 2
    ) p ON true
    WHERE d.is_direct
) k
WHERE k.id = t.id;
-- squawk-ignore disallowed-unique-constraint, constraint-missing-not-valid
ALTER TABLE threads ADD CONSTRAINT uq_threads_direct_key UNIQUE (direct_key);
-- squawk-ignore constraint-missing-not-valid
ALTER TABLE threads ADD CONSTRAINT ck_threads_direct_key
    CHECK (is_direct = (direct_key IS NOT NULL));
ALTER TABLE archived_threads ADD COLUMN direct_key text;

-- migrate:down

DO $$
DECLARE
    v_live bigint;
    v_archived bigint;
BEGIN
    SELECT count(*) INTO v_live
    FROM threads t
    WHERE t.direct_key IS NOT NULL
      AND t.direct_key IS DISTINCT FROM (
          SELECT min(tp.user_id::text COLLATE "C") || ':' || max(tp.user_id::text COLLATE "C")
          FROM thread_participants tp WHERE tp.thread_id = t.id
          HAVING count(*) = 2);
    SELECT count(*) INTO v_archived FROM archived_threads WHERE direct_key IS NOT NULL;
    IF v_live + v_archived > 0
       AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0003 would drop % direct thread key(s) that cannot be '
            'rebuilt (% live whose pair is not their two participants, % archived); '
            'rerun with --allow-data-loss to drop them', v_live + v_archived, v_live, v_archived;
    END IF;
END $$;

-- squawk-ignore ban-drop-column
ALTER TABLE archived_threads DROP COLUMN direct_key;
-- squawk-ignore ban-drop-constraint
ALTER TABLE threads DROP CONSTRAINT ck_threads_direct_key;
-- squawk-ignore ban-drop-constraint
ALTER TABLE threads DROP CONSTRAINT uq_threads_direct_key;
-- squawk-ignore ban-drop-column
ALTER TABLE threads DROP COLUMN direct_key;
