-- Streams stay equal to history when a user is deleted, and sends serialise
-- with that deletion.
--
-- DeleteUser's cascade would remove the user's messages (and clear parent_id
-- of replies to them) with no position in the thread's stream, so a stream
-- consumer would keep messages that ListMessages no longer returns. Instead,
-- chat_forget_user_messages() runs first in DeleteUser's transaction: every
-- reply by someone else to the user's messages loses its parent at a new
-- position (an `updated` event), and every message of the user leaves history
-- at a new position recorded in message_removals (a `removed` event). Archival
-- moves those records with their thread (archived_message_removals), so a
-- restored thread's cursors keep their meaning.
--
-- Lock order: a deletion locks the user row, then the affected threads in id
-- order. chat_send_message now locks the sender's row (FOR KEY SHARE, which its
-- foreign-key check took anyway, later) before the thread row, so a send and a
-- deletion never wait on each other in opposite orders, and no message of the
-- user can commit between the deletion's scan and its DELETE.
--
-- squawk: message_removals is new and empty; the function replacement takes no
-- table lock.
--
-- Amended (issue 14): the down part refuses to drop removal records (live or
-- archived) unless run with --allow-data-loss: streams resuming from a cursor
-- before a removal would miss it. The up part is unchanged, so a database that
-- applied the earlier text (checksum below) accepts this one (db/README.md,
-- "Amending an applied migration").
-- migrate:supersedes 84326ab84ca537a40e5090a558bb65caa1f17017c7772bc1943330384d00b872

-- migrate:up

CREATE TABLE message_removals (
    thread_id uuid NOT NULL,
    position bigint NOT NULL,
    message_id uuid NOT NULL,
    user_id uuid NOT NULL,
    removed_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_message_removals PRIMARY KEY (thread_id, position),
    CONSTRAINT fk_message_removal_thread FOREIGN KEY (thread_id)
        REFERENCES threads (id) ON DELETE CASCADE
);
CREATE TABLE archived_message_removals (LIKE message_removals INCLUDING ALL);

CREATE FUNCTION chat_forget_user_messages(p_user_id uuid) RETURNS integer
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
        UPDATE threads t SET last_seq = v_base + v_orphaned + v_removed WHERE t.id = v_thread;
        PERFORM pg_notify('chat_thread_events',
                          v_thread::text || ':' || (v_base + v_orphaned + v_removed)::text);
        v_total := v_total + v_removed;
    END LOOP;
    RETURN v_total;
END $$;

-- As in 0004, with the sender's row locked before the thread's (see above).
CREATE OR REPLACE FUNCTION chat_send_message(
    p_thread_id uuid,
    p_user_id uuid,
    p_content text,
    p_parent_id uuid,
    p_metadata jsonb,
    p_request_id uuid,
    p_attachments jsonb
) RETURNS TABLE (
    outcome text, id uuid, thread_id uuid, user_id uuid, content text, parent_id uuid,
    status varchar, metadata jsonb, created_at timestamptz, updated_at timestamptz,
    seq bigint, change_seq bigint, attachments jsonb
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_last_seq bigint;
    v_created timestamptz;
    v_archived boolean;
    v_existing uuid;
    v_id uuid;
    v_outcome text;
    v_sender_exists boolean;
BEGIN
    -- A deletion of the sender (chat_forget_user_messages) waits for this send,
    -- or this send waits for it and is then refused as 'inactive'.
    PERFORM 1 FROM users u WHERE u.id = p_user_id FOR KEY SHARE;
    v_sender_exists := FOUND;
    -- Every send to a thread serialises here: positions and created_at follow
    -- commit order, and a racing retry waits for the original to commit.
    SELECT t.is_archived INTO v_archived FROM threads t WHERE t.id = p_thread_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'thread_not_found'::text, NULL::uuid, NULL::uuid, NULL::uuid,
            NULL::text, NULL::uuid, NULL::varchar, NULL::jsonb, NULL::timestamptz,
            NULL::timestamptz, NULL::bigint, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;
    IF p_request_id IS NOT NULL THEN
        SELECT m.id INTO v_existing FROM messages m
        WHERE m.user_id = p_user_id AND m.request_id = p_request_id;
        IF FOUND THEN
            v_outcome := 'duplicate';
            v_id := v_existing;
        END IF;
    END IF;
    IF v_outcome IS NULL AND NOT v_sender_exists THEN
        v_outcome := 'inactive';  -- deleted, maybe while this send waited for its row
    END IF;
    IF v_outcome IS NULL THEN
        v_outcome := chat_send_refusal(p_thread_id, p_user_id, p_parent_id, v_archived);
    END IF;
    IF v_outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_outcome, m.id, m.thread_id, m.user_id, m.content, m.parent_id,
            m.status, m.metadata, m.created_at, m.updated_at, m.seq, m.change_seq,
            chat_message_attachments(m.id)
        FROM (SELECT 1) AS one LEFT JOIN messages m ON m.id = v_id;
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
    RETURN QUERY SELECT 'created'::text, m.id, m.thread_id, m.user_id, m.content, m.parent_id,
        m.status, m.metadata, m.created_at, m.updated_at, m.seq, m.change_seq,
        chat_message_attachments(m.id)
    FROM messages m WHERE m.id = v_id;
END $$;

-- migrate:down

DO $$
DECLARE v_rows bigint;
BEGIN
    SELECT (SELECT count(*) FROM message_removals)
         + (SELECT count(*) FROM archived_message_removals)
    INTO v_rows;
    IF v_rows > 0 AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0008 would drop % removal record(s) (live and archived '
            'message_removals: streams resuming before a removal would miss it); '
            'rerun with --allow-data-loss to drop them', v_rows;
    END IF;
END $$;

-- chat_send_message as 0004 left it.
CREATE OR REPLACE FUNCTION chat_send_message(
    p_thread_id uuid,
    p_user_id uuid,
    p_content text,
    p_parent_id uuid,
    p_metadata jsonb,
    p_request_id uuid,
    p_attachments jsonb
) RETURNS TABLE (
    outcome text, id uuid, thread_id uuid, user_id uuid, content text, parent_id uuid,
    status varchar, metadata jsonb, created_at timestamptz, updated_at timestamptz,
    seq bigint, change_seq bigint, attachments jsonb
)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_last_seq bigint;
    v_created timestamptz;
    v_archived boolean;
    v_existing uuid;
    v_id uuid;
    v_outcome text;
BEGIN
    -- Every send to a thread serialises here: positions and created_at follow
    -- commit order, and a racing retry waits for the original to commit.
    SELECT t.is_archived INTO v_archived FROM threads t WHERE t.id = p_thread_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'thread_not_found'::text, NULL::uuid, NULL::uuid, NULL::uuid,
            NULL::text, NULL::uuid, NULL::varchar, NULL::jsonb, NULL::timestamptz,
            NULL::timestamptz, NULL::bigint, NULL::bigint, NULL::jsonb;
        RETURN;
    END IF;
    IF p_request_id IS NOT NULL THEN
        SELECT m.id INTO v_existing FROM messages m
        WHERE m.user_id = p_user_id AND m.request_id = p_request_id;
        IF FOUND THEN
            v_outcome := 'duplicate';
            v_id := v_existing;
        END IF;
    END IF;
    IF v_outcome IS NULL THEN
        v_outcome := chat_send_refusal(p_thread_id, p_user_id, p_parent_id, v_archived);
    END IF;
    IF v_outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_outcome, m.id, m.thread_id, m.user_id, m.content, m.parent_id,
            m.status, m.metadata, m.created_at, m.updated_at, m.seq, m.change_seq,
            chat_message_attachments(m.id)
        FROM (SELECT 1) AS one LEFT JOIN messages m ON m.id = v_id;
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
    RETURN QUERY SELECT 'created'::text, m.id, m.thread_id, m.user_id, m.content, m.parent_id,
        m.status, m.metadata, m.created_at, m.updated_at, m.seq, m.change_seq,
        chat_message_attachments(m.id)
    FROM messages m WHERE m.id = v_id;
END $$;

-- squawk-ignore ban-drop-function
DROP FUNCTION chat_forget_user_messages(uuid);
DROP TABLE archived_message_removals;
DROP TABLE message_removals;
