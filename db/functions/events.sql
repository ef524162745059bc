-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions").
--
-- The user streams' log (migration 0013): every change a member of a thread can
-- see is appended to thread_events by the triggers below, in the writer's
-- transaction and under the thread's row lock (every writer holds it: sends,
-- edits, deletions and attachments FOR UPDATE, membership changes FOR UPDATE,
-- MarkRead FOR SHARE). Triggers, not calls in each writer, so no path that
-- changes these tables (the services, DeleteUser, `db archive`, a cascade)
-- can skip the log. Positions come later, from chat_sequence_events.

-- The thread as a user stream shows it.
CREATE OR REPLACE FUNCTION chat_thread_json(p_thread_id uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', t.id, 'name', t.name, 'is_direct', t.is_direct,
                              'is_archived', t.is_archived,
                              'last_message_at', t.last_message_at,
                              'created_at', t.created_at, 'updated_at', t.updated_at)
    FROM threads t WHERE t.id = p_thread_id
$$;

-- A participant row is logged as to_jsonb of the row (no helper taking the
-- row type: a function depending on a table's type would block its DROP).
-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS chat_participant_json(thread_participants);

-- Messages: one event per visible change (a creation, or a new change_seq),
-- logged at commit (a deferred trigger) so it carries the message as committed,
-- attachments included. A message gone by then (its thread deleted in the same
-- transaction) logs nothing.
CREATE OR REPLACE FUNCTION chat_log_message() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_message jsonb;
    v_status text;
BEGIN
    SELECT to_jsonb(m) - 'request_id' - 'request_digest'
               || jsonb_build_object('attachments', chat_message_attachments(m.id)),
           m.status
    INTO v_message, v_status
    FROM messages m WHERE m.id = NEW.id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    INSERT INTO thread_events (thread_id, kind, message_id, payload)
    VALUES (NEW.thread_id,
            CASE WHEN TG_OP = 'INSERT' THEN 'message_created'
                 WHEN v_status = 'deleted' THEN 'message_deleted'
                 ELSE 'message_updated' END,
            NEW.id,
            jsonb_build_object('message', v_message));
    RETURN NULL;
END $$;

-- A message that left history with its author (chat_forget_user_messages).
CREATE OR REPLACE FUNCTION chat_log_message_removal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO thread_events (thread_id, kind, message_id, payload)
    VALUES (NEW.thread_id, 'message_deleted', NEW.message_id,
            jsonb_build_object('message', jsonb_build_object(
                'id', NEW.message_id, 'thread_id', NEW.thread_id, 'user_id', NEW.user_id,
                'content', '', 'status', 'deleted', 'created_at', NEW.removed_at,
                'updated_at', NEW.removed_at, 'attachments', '[]'::jsonb)));
    RETURN NULL;
END $$;

-- A participant's unread count, exact, from the counters (unread.sql); 0 for
-- one who is gone. It replaced chat_unread_after, which counted messages up to a cap:
-- squawk-ignore ban-drop-function
DROP FUNCTION IF EXISTS chat_unread_after(uuid, uuid, timestamptz, integer);
CREATE OR REPLACE FUNCTION chat_unread_of(p_thread_id uuid, p_user_id uuid) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((
        SELECT t.message_count - p.read_count
        FROM threads t JOIN thread_participants p ON p.thread_id = t.id
        WHERE t.id = p_thread_id AND p.user_id = p_user_id), 0)
$$;

-- Participants (at commit, as messages): joined (created a thread, added, a
-- direct thread made), left
-- (why: chat.leave_reason set by the leaving transaction, 'thread_deleted' when
-- the thread went, else 'removed'), role changed, read mark moved.
CREATE OR REPLACE FUNCTION chat_log_participant() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_thread jsonb;
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO thread_events (thread_id, kind, user_id, payload)
        VALUES (NEW.thread_id, 'participant_joined', NEW.user_id,
                jsonb_build_object('thread', chat_thread_json(NEW.thread_id),
                                   'participant', to_jsonb(NEW)));
    ELSIF TG_OP = 'DELETE' THEN
        v_thread := chat_thread_json(OLD.thread_id);
        INSERT INTO thread_events (thread_id, kind, user_id, payload)
        VALUES (OLD.thread_id, 'participant_left', OLD.user_id,
                jsonb_build_object(
                    'participant', to_jsonb(OLD),
                    'reason', CASE
                        WHEN v_thread IS NULL THEN 'thread_deleted'
                        ELSE coalesce(nullif(current_setting('chat.leave_reason', true), ''),
                                      'removed') END));
    ELSE
        IF NEW.role IS DISTINCT FROM OLD.role THEN
            INSERT INTO thread_events (thread_id, kind, user_id, payload)
            VALUES (NEW.thread_id, 'participant_updated', NEW.user_id,
                    jsonb_build_object('participant', to_jsonb(NEW)));
        END IF;
        -- A send moves its sender's mark too; their message says so (send.sql).
        IF NEW.last_read_at IS DISTINCT FROM OLD.last_read_at
           AND current_setting('chat.read_by_own_send', true) IS DISTINCT FROM 'on' THEN
            INSERT INTO thread_events (thread_id, kind, user_id, payload)
            VALUES (NEW.thread_id, 'read_marked', NEW.user_id,
                    jsonb_build_object(
                        'participant', to_jsonb(NEW),
                        'unread', chat_unread_of(NEW.thread_id, NEW.user_id),
                        'exact', true));
        END IF;
    END IF;
    RETURN NULL;
END $$;

-- Threads: renamed, archived or unarchived.
CREATE OR REPLACE FUNCTION chat_log_thread() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO thread_events (thread_id, kind, payload)
    VALUES (NEW.id, 'thread_updated',
            jsonb_build_object('thread', chat_thread_json(NEW.id)));
    RETURN NULL;
END $$;

-- The sequencer: gives committed events without a position the next positions,
-- in id order, and tells the user streams (chat_notify_log) at its commit. One
-- runs at a time (event_log's row); a caller that finds it taken returns NULL
-- at once, since the running one or the next tick does the work. Returns the
-- log's last position. For any two events of one thread the second was written
-- after the first committed (the thread lock), so it has the larger id and is
-- never visible without the first: positions follow commit order in a thread.
CREATE OR REPLACE FUNCTION chat_sequence_events(p_limit integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
    v_count bigint;
BEGIN
    -- An idle tick reads one index entry and writes nothing.
    IF NOT EXISTS (SELECT 1 FROM thread_events WHERE position IS NULL) THEN
        RETURN (SELECT l.last_position FROM event_log l);
    END IF;
    SELECT l.last_position INTO v_last FROM event_log l FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    WITH next AS (
        SELECT e.id, v_last + row_number() OVER (ORDER BY e.id) AS position
        FROM (SELECT id FROM thread_events WHERE position IS NULL ORDER BY id LIMIT p_limit) e
    )
    UPDATE thread_events t SET position = n.position FROM next n WHERE t.id = n.id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        v_last := v_last + v_count;
        UPDATE event_log SET last_position = v_last;
        PERFORM chat_notify_log(v_last);
    END IF;
    RETURN v_last;
END $$;

-- Retention: drops the oldest positioned events written before now() - p_keep,
-- at most p_limit of them, and moves event_log.retained_after past them (a
-- cursor before it is then CURSOR_EXPIRED). Returns retained_after.
CREATE OR REPLACE FUNCTION chat_prune_events(p_keep interval, p_limit integer) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_after bigint;
    v_upto bigint;
BEGIN
    SELECT l.retained_after INTO v_after FROM event_log l FOR UPDATE;
    -- The oldest p_limit events; the prefix of them written before the cutoff.
    SELECT coalesce(min(e.position) FILTER (WHERE e.created_at >= now() - p_keep) - 1,
                    max(e.position))
    INTO v_upto
    FROM (SELECT position, created_at FROM thread_events
          WHERE position > v_after ORDER BY position LIMIT p_limit) e;
    IF v_upto > v_after THEN
        DELETE FROM thread_events WHERE position > v_after AND position <= v_upto;
        UPDATE event_log SET retained_after = v_upto;
        v_after := v_upto;
    END IF;
    RETURN v_after;
END $$;

-- The triggers (schema, but they call the functions above, which the
-- migrations no longer define: kept here so each lands with its function).
-- squawk-ignore ban-drop-trigger
DROP TRIGGER IF EXISTS trg_messages_log ON messages;
CREATE CONSTRAINT TRIGGER trg_messages_log AFTER INSERT OR UPDATE OF change_seq ON messages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION chat_log_message();
CREATE OR REPLACE TRIGGER trg_message_removals_log AFTER INSERT ON message_removals
    FOR EACH ROW EXECUTE FUNCTION chat_log_message_removal();
-- Deferred too, as messages. Updates are queued only when a role or a read mark
-- moved, and not for the mark a send moves (chat.read_by_own_send): most
-- sends queue nothing here.
-- squawk-ignore ban-drop-trigger
DROP TRIGGER IF EXISTS trg_participants_log ON thread_participants;
CREATE CONSTRAINT TRIGGER trg_participants_log
    AFTER INSERT OR DELETE ON thread_participants
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION chat_log_participant();
-- squawk-ignore ban-drop-trigger
DROP TRIGGER IF EXISTS trg_participants_change_log ON thread_participants;
CREATE CONSTRAINT TRIGGER trg_participants_change_log
    AFTER UPDATE OF role, last_read_at ON thread_participants
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.role IS DISTINCT FROM NEW.role
          OR (OLD.last_read_at IS DISTINCT FROM NEW.last_read_at
              AND current_setting('chat.read_by_own_send', true) IS DISTINCT FROM 'on'))
    EXECUTE FUNCTION chat_log_participant();
CREATE OR REPLACE TRIGGER trg_threads_log AFTER UPDATE OF name, is_archived ON threads
    FOR EACH ROW
    WHEN (OLD.name IS DISTINCT FROM NEW.name OR OLD.is_archived IS DISTINCT FROM NEW.is_archived)
    EXECUTE FUNCTION chat_log_thread();
