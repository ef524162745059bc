-- Unread counts from counters instead of counting messages on every read
-- (issue 18; db/functions/unread.sql keeps them, services/threads/store.py
-- reads them): threads.message_count, the thread's messages not deleted, and
-- thread_participants.read_count, those of them the participant has read
-- (created at or before their read mark, or their own). A participant's unread
-- count is message_count - read_count. Archive rows get the same columns (0:
-- archival empties a thread's counters with its messages), so archival's
-- `INSERT ... SELECT *` still lines up.
--
-- Online: the columns are added with a constant default (no table rewrite, a
-- moment's lock), then existing rows are counted in batches of 1000 threads,
-- each batch its own transaction holding only its threads' rows (locked in id
-- order, as every writer of a thread locks it) while it counts. Re-runnable:
-- a rerun counts every thread again from scratch. The triggers that keep the
-- counters afterwards come with db/functions/unread.sql, applied by the same
-- `up` right after this migration; a write by services of the previous release
-- in between is not counted (stop writers for the `up`, or run
-- `SELECT chat_unread_recount(array_agg(id)) FROM threads` after it).
--
-- Down: the columns go (nothing is lost: the up part counts them again), with
-- the triggers of unread.sql that read them.
-- migrate:no-transaction

-- migrate:up

ALTER TABLE threads ADD COLUMN IF NOT EXISTS message_count bigint NOT NULL DEFAULT 0;
ALTER TABLE archived_threads ADD COLUMN IF NOT EXISTS message_count bigint NOT NULL DEFAULT 0;
ALTER TABLE thread_participants ADD COLUMN IF NOT EXISTS read_count bigint NOT NULL DEFAULT 0;
ALTER TABLE archived_thread_participants
    ADD COLUMN IF NOT EXISTS read_count bigint NOT NULL DEFAULT 0;

DO $$
DECLARE
    v_after uuid;
    v_ids uuid[];
BEGIN
    LOOP
        SELECT array_agg(b.id ORDER BY b.id) INTO v_ids
        FROM (SELECT t.id FROM threads t WHERE v_after IS NULL OR t.id > v_after
              ORDER BY t.id LIMIT 1000) b;
        EXIT WHEN v_ids IS NULL;
        PERFORM 1 FROM threads t WHERE t.id = ANY (v_ids) ORDER BY t.id FOR NO KEY UPDATE;
        UPDATE threads t SET message_count = c.n
        FROM (SELECT t2.id,
                     (SELECT count(*) FROM messages m
                      WHERE m.thread_id = t2.id AND m.status <> 'deleted') AS n
              FROM threads t2 WHERE t2.id = ANY (v_ids)) c
        WHERE t.id = c.id AND t.message_count <> c.n;
        -- Read: with no mark, the participant's own messages; with one,
        -- everything but the others' messages after it.
        UPDATE thread_participants p SET read_count = c.n
        FROM (SELECT q.thread_id, q.user_id,
                     CASE WHEN q.last_read_at IS NULL THEN
                         (SELECT count(*) FROM messages m
                          WHERE m.thread_id = q.thread_id AND m.user_id = q.user_id
                            AND m.status <> 'deleted')
                     ELSE t.message_count
                         - (SELECT count(*) FROM messages m
                            WHERE m.thread_id = q.thread_id
                              AND m.created_at > q.last_read_at
                              AND m.user_id <> q.user_id AND m.status <> 'deleted')
                     END AS n
              FROM thread_participants q JOIN threads t ON t.id = q.thread_id
              WHERE q.thread_id = ANY (v_ids)) c
        WHERE p.thread_id = c.thread_id AND p.user_id = c.user_id AND p.read_count <> c.n;
        v_after := v_ids[array_length(v_ids, 1)];
        COMMIT;
    END LOOP;
END $$;

-- migrate:down

DROP TRIGGER IF EXISTS trg_threads_unread_new ON threads;
DROP TRIGGER IF EXISTS trg_participants_unread_join ON thread_participants;
DROP TRIGGER IF EXISTS trg_participants_unread_mark ON thread_participants;
DROP TRIGGER IF EXISTS trg_messages_unread_insert ON messages;
DROP TRIGGER IF EXISTS trg_messages_unread_delete ON messages;
DROP TRIGGER IF EXISTS trg_messages_unread_update ON messages;
-- The counters only (the up part counts them again); nothing reads them below 0014.
-- squawk-ignore ban-drop-column
ALTER TABLE archived_thread_participants DROP COLUMN IF EXISTS read_count;
-- squawk-ignore ban-drop-column
ALTER TABLE thread_participants DROP COLUMN IF EXISTS read_count;
-- squawk-ignore ban-drop-column
ALTER TABLE archived_threads DROP COLUMN IF EXISTS message_count;
-- squawk-ignore ban-drop-column
ALTER TABLE threads DROP COLUMN IF EXISTS message_count;
