-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions").
--
-- Every NOTIFY the schema and the services send goes through these functions:
-- the channel names and payload formats are written here and nowhere else in
-- SQL. services/common/channels.py holds the same names (to LISTEN on) and the
-- typed payloads with their parsers; tests/db/test_notify.py checks they agree.
-- Python calls these functions rather than pg_notify.

-- A thread's stream moved on to `p_position` (a message created, edited,
-- deleted, an attachment added, messages removed): "thread_id:position" on
-- chat_thread_events (channels.ThreadEvent), with ":traceparent" appended for a
-- traced write (the stream's fan-out span links to it). Delivered at commit.
-- The two-argument form this replaced:
-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS chat_notify_thread_event(uuid, bigint);
CREATE OR REPLACE FUNCTION chat_notify_thread_event(
    p_thread_id uuid, p_position bigint, p_traceparent text DEFAULT NULL
) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('chat_thread_events', p_thread_id::text || ':' || p_position::text
        || coalesce(':' || p_traceparent, ''))
$$;

-- Several threads' wake-ups in one transaction, after the writes committed
-- (the messages service's waker batches them): one commit for the batch.
CREATE OR REPLACE FUNCTION chat_notify_thread_events(
    p_thread_ids uuid[], p_positions bigint[], p_traceparents text[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    FOR i IN 1 .. coalesce(array_length(p_thread_ids, 1), 0) LOOP
        PERFORM chat_notify_thread_event(p_thread_ids[i], p_positions[i], p_traceparents[i]);
    END LOOP;
END $$;

-- Open streams may have to end: {"thread_id": ..., "user_id": ...} on
-- chat_membership (channels.MembershipChange). A participant left (both set), a
-- thread was deleted or archived (user_id null), a user was deactivated or
-- deleted (thread_id null: every thread). Delivered at commit.
CREATE OR REPLACE FUNCTION chat_notify_membership(p_thread_id uuid, p_user_id uuid)
RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('chat_membership',
                     json_build_object('thread_id', p_thread_id, 'user_id', p_user_id)::text)
$$;

-- The user streams' log reached `p_position` (chat_sequence_events): the
-- position as text on chat_log (channels.LOG_POSITION). Sent by the sequencer's
-- transaction, never by a writer's.
CREATE OR REPLACE FUNCTION chat_notify_log(p_position bigint)
RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('chat_log', p_position::text)
$$;

-- A participant is typing: {"thread_id", "user_id", "expire_time"} on
-- chat_typing (channels.Typing). Never stored; sent outside any write.
CREATE OR REPLACE FUNCTION chat_notify_typing(
    p_thread_id uuid, p_user_id uuid, p_expire_time timestamptz
) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_notify('chat_typing', json_build_object(
        'thread_id', p_thread_id, 'user_id', p_user_id, 'expire_time', p_expire_time)::text)
$$;
