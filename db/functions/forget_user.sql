-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions"). Moved from migration 0008; the
-- position and notification through chat_bump_thread (positions.sql).

-- DeleteUser, before the cascade (0008): every reply by someone else to the
-- user's messages loses its parent at a new position (an `updated` event), then
-- every message of the user leaves history at a new position recorded in
-- message_removals (a `removed` event). Locks the user row, then the affected
-- threads in id order.
CREATE OR REPLACE FUNCTION chat_forget_user_messages(p_user_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_thread uuid;
    v_base bigint;
    v_orphaned integer;
    v_removed integer;
    v_total integer := 0;
BEGIN
    PERFORM 1 FROM users u WHERE u.id = p_user_id FOR UPDATE;
    FOR v_thread IN
        SELECT t.id FROM threads t
        WHERE t.id IN (SELECT m.thread_id FROM messages m WHERE m.user_id = p_user_id)
        ORDER BY t.id
        FOR UPDATE
    LOOP
        SELECT t.last_seq INTO v_base FROM threads t WHERE t.id = v_thread;
        -- Replies by others to the user's messages: the parent goes (as the
        -- foreign key's SET NULL would), at positions base+1 ..
        WITH orphans AS (
            SELECT r.id, row_number() OVER (ORDER BY r.seq) AS n
            FROM messages r JOIN messages p ON p.id = r.parent_id
            WHERE r.thread_id = v_thread AND p.user_id = p_user_id AND r.user_id <> p_user_id
        )
        UPDATE messages m
        SET parent_id = NULL, change_seq = v_base + o.n,
            updated_at = greatest(now(), m.updated_at + interval '1 microsecond')
        FROM orphans o WHERE m.id = o.id;
        GET DIAGNOSTICS v_orphaned = ROW_COUNT;
        -- .. then each of the user's messages leaves history at its own position.
        INSERT INTO message_removals (thread_id, position, message_id, user_id)
        SELECT v_thread, v_base + v_orphaned + row_number() OVER (ORDER BY m.seq), m.id, m.user_id
        FROM messages m WHERE m.thread_id = v_thread AND m.user_id = p_user_id;
        GET DIAGNOSTICS v_removed = ROW_COUNT;
        DELETE FROM messages m WHERE m.thread_id = v_thread AND m.user_id = p_user_id;
        -- last_seq is still v_base (the lock is ours): it becomes the last position used.
        PERFORM chat_bump_thread(v_thread, v_orphaned + v_removed);
        v_total := v_total + v_removed;
    END LOOP;
    RETURN v_total;
END $$;
