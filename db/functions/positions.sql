-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions").
--
-- Stream positions: threads.last_seq counts every change in a thread (create,
-- edit, delete, attachment, removal), moved on under the thread row lock, so
-- positions follow commit order (migration 0004).

-- The one "bump the thread's position and notify": moves last_seq on by
-- `p_positions` (the caller then uses last_seq - p_positions + 1 .. last_seq),
-- tells the stream about the last one (at commit) and returns it; NULL, without
-- a notification, when the thread does not exist. A session that set
-- chat.wake_after_commit = on (the messages service's pool, at connection start)
-- wakes the streams itself after its commit, batched (services/messages/streams/
-- waker.py): a NOTIFY in the writer's transaction makes PostgreSQL commit such
-- transactions one at a time, which capped sends per second. Callers hold the thread row
-- lock already (a send, an edit, a deletion, DeleteUser) or take it here (the
-- trigger below). Used by chat_send_message, chat_assign_message_seq,
-- chat_forget_user_messages and the messages service's edit, delete and attach.
-- With `p_new_message` (a send: chat_send_message) it also stamps
-- last_message_at, strictly after the thread's latest (the send's created_at),
-- and counts the new message in threads.message_count (unread.sql), in the
-- same UPDATE: a send writes one new version of the thread row, not two.
-- The two-argument form this replaced (a database that applied it would
-- otherwise find two candidates for chat_bump_thread(x)).
-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS chat_bump_thread(uuid, bigint);
CREATE OR REPLACE FUNCTION chat_bump_thread(
    p_thread_id uuid, p_positions bigint DEFAULT 1, p_new_message boolean DEFAULT false
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_last_seq bigint;
BEGIN
    UPDATE threads t
    SET last_seq = t.last_seq + p_positions,
        last_message_at = CASE WHEN p_new_message
            THEN greatest(clock_timestamp(),
                          coalesce(t.last_message_at, '-infinity') + interval '1 microsecond')
            ELSE t.last_message_at END,
        message_count = t.message_count + CASE WHEN p_new_message THEN 1 ELSE 0 END
    WHERE t.id = p_thread_id
    RETURNING t.last_seq INTO v_last_seq;
    IF FOUND AND current_setting('chat.wake_after_commit', true) IS DISTINCT FROM 'on' THEN
        PERFORM chat_notify_thread_event(p_thread_id, v_last_seq);
    END IF;
    RETURN v_last_seq;
END $$;

-- Rows written without positions (bulk loads, tests) get them from the thread
-- counter, like a send; sends set them explicitly. (0004; the trigger
-- trg_messages_assign_seq itself is schema and stays in 0004.)
CREATE OR REPLACE FUNCTION chat_assign_message_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS NULL THEN
        NEW.seq := chat_bump_thread(NEW.thread_id);
    END IF;
    NEW.change_seq := coalesce(NEW.change_seq, NEW.seq);
    RETURN NEW;
END $$;
