-- Messages: commit-ordered positions for the live stream, durable idempotency,
-- and the send transaction as one server-side function (one round trip).
--
-- threads.last_seq counts every change in a thread (create, edit, delete), bumped
-- under the thread row lock; messages.seq is the position a message was created
-- at and messages.change_seq the position of its latest change. Positions are
-- therefore in commit order per thread (the lock is held to commit), which
-- created_at alone is not. Stream cursors are change_seq positions.
--
-- squawk: ships with 0001, before any row exists (see 0003).

-- migrate:up

ALTER TABLE threads ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE archived_threads ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;

ALTER TABLE messages ADD COLUMN seq bigint;
ALTER TABLE messages ADD COLUMN change_seq bigint;
ALTER TABLE messages ADD COLUMN request_id uuid;
ALTER TABLE archived_messages ADD COLUMN seq bigint;
ALTER TABLE archived_messages ADD COLUMN change_seq bigint;
ALTER TABLE archived_messages ADD COLUMN request_id uuid;

-- Rows written without positions (bulk loads, tests) get them from the thread
-- counter under its row lock, like a send; sends set them explicitly.
CREATE FUNCTION chat_assign_message_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS NULL THEN
        UPDATE threads SET last_seq = last_seq + 1 WHERE id = NEW.thread_id
        RETURNING last_seq INTO NEW.seq;
    END IF;
    NEW.change_seq := coalesce(NEW.change_seq, NEW.seq);
    RETURN NEW;
END $$;

CREATE TRIGGER trg_messages_assign_seq BEFORE INSERT ON messages
    FOR EACH ROW EXECUTE FUNCTION chat_assign_message_seq();
-- squawk-ignore adding-not-nullable-field
ALTER TABLE messages ALTER COLUMN seq SET NOT NULL;
-- squawk-ignore adding-not-nullable-field
ALTER TABLE messages ALTER COLUMN change_seq SET NOT NULL;

-- squawk-ignore require-concurrent-index-creation
CREATE UNIQUE INDEX idx_messages_thread_change ON messages (thread_id, change_seq);
-- squawk-ignore require-concurrent-index-creation
CREATE UNIQUE INDEX idx_messages_request ON messages (user_id, request_id)
    WHERE request_id IS NOT NULL;

-- The whole send in one transaction and one round trip. Returns an outcome:
-- 'created' or 'duplicate' (a retry of request_id: the original, nothing
-- written) with the message; or a refusal ('thread_not_found', 'not_participant',
-- 'archived', 'inactive', 'bad_parent') and no row.
CREATE FUNCTION chat_send_message(
    p_thread_id uuid,
    p_user_id uuid,
    p_content text,
    p_parent_id uuid,
    p_metadata jsonb,
    p_request_id uuid,
    p_attachments jsonb
) RETURNS TABLE (outcome text, message_id uuid)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_last_seq bigint;
    v_created timestamptz;
    v_archived boolean;
    v_existing uuid;
    v_id uuid;
BEGIN
    -- Every send to a thread serialises here: positions and created_at follow
    -- commit order, and a racing retry waits for the original to commit.
    SELECT t.is_archived INTO v_archived FROM threads t WHERE t.id = p_thread_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'thread_not_found'::text, NULL::uuid;
        RETURN;
    END IF;
    IF p_request_id IS NOT NULL THEN
        SELECT m.id INTO v_existing FROM messages m
        WHERE m.user_id = p_user_id AND m.request_id = p_request_id;
        IF FOUND THEN
            RETURN QUERY SELECT 'duplicate'::text, v_existing;
            RETURN;
        END IF;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM thread_participants p
                   WHERE p.thread_id = p_thread_id AND p.user_id = p_user_id) THEN
        RETURN QUERY SELECT 'not_participant'::text, NULL::uuid;
        RETURN;
    END IF;
    IF v_archived THEN
        RETURN QUERY SELECT 'archived'::text, NULL::uuid;
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_user_id AND u.is_active) THEN
        RETURN QUERY SELECT 'inactive'::text, NULL::uuid;
        RETURN;
    END IF;
    IF p_parent_id IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM messages m WHERE m.id = p_parent_id AND m.thread_id = p_thread_id
    ) THEN
        RETURN QUERY SELECT 'bad_parent'::text, NULL::uuid;
        RETURN;
    END IF;

    UPDATE threads t
    SET last_seq = t.last_seq + 1,
        last_message_at = greatest(
            clock_timestamp(),
            coalesce(t.last_message_at, '-infinity') + interval '1 microsecond')
    WHERE t.id = p_thread_id
    RETURNING t.last_seq, t.last_message_at INTO v_last_seq, v_created;

    INSERT INTO messages (thread_id, user_id, content, parent_id, metadata, seq, change_seq,
                          request_id, created_at, updated_at)
    VALUES (p_thread_id, p_user_id, p_content, p_parent_id, p_metadata, v_last_seq, v_last_seq,
            p_request_id, v_created, v_created)
    RETURNING id INTO v_id;

    INSERT INTO message_attachments (message_id, url, type, name, size, metadata, created_at)
    SELECT v_id, a ->> 'url', a ->> 'type', a ->> 'name', (a ->> 'size')::integer,
           nullif(a -> 'metadata', 'null'::jsonb), v_created
    FROM jsonb_array_elements(coalesce(p_attachments, '[]'::jsonb)) AS a;

    -- The sender has read everything up to their own message.
    UPDATE thread_participants p
    SET last_read_at = greatest(p.last_read_at, v_created)
    WHERE p.thread_id = p_thread_id AND p.user_id = p_user_id;

    PERFORM pg_notify('chat_thread_events', p_thread_id::text || ':' || v_last_seq::text);
    RETURN QUERY SELECT 'created'::text, v_id;
END $$;

-- migrate:down

-- squawk-ignore ban-drop-function
DROP FUNCTION chat_send_message(uuid, uuid, text, uuid, jsonb, uuid, jsonb);
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX idx_messages_request;
-- squawk-ignore require-concurrent-index-deletion
DROP INDEX idx_messages_thread_change;
DROP TRIGGER trg_messages_assign_seq ON messages;
-- squawk-ignore ban-drop-function
DROP FUNCTION chat_assign_message_seq();
-- squawk-ignore ban-drop-column
ALTER TABLE archived_messages DROP COLUMN request_id;
-- squawk-ignore ban-drop-column
ALTER TABLE archived_messages DROP COLUMN change_seq;
-- squawk-ignore ban-drop-column
ALTER TABLE archived_messages DROP COLUMN seq;
-- squawk-ignore ban-drop-column
ALTER TABLE messages DROP COLUMN request_id;
-- squawk-ignore ban-drop-column
ALTER TABLE messages DROP COLUMN change_seq;
-- squawk-ignore ban-drop-column
ALTER TABLE messages DROP COLUMN seq;
-- squawk-ignore ban-drop-column
ALTER TABLE archived_threads DROP COLUMN last_seq;
-- squawk-ignore ban-drop-column
ALTER TABLE threads DROP COLUMN last_seq;
