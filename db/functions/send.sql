-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions"). Moved from the migrations named below;
-- positions and notifications through chat_bump_thread (positions.sql).

-- Why a send must be refused, or NULL when it may go ahead. (0004)
CREATE OR REPLACE FUNCTION chat_send_refusal(
    p_thread_id uuid, p_user_id uuid, p_parent_id uuid, p_archived boolean
) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM thread_participants p
                         WHERE p.thread_id = p_thread_id AND p.user_id = p_user_id)
            THEN 'not_participant'
        WHEN p_archived THEN 'archived'
        WHEN NOT EXISTS (SELECT 1 FROM users u WHERE u.id = p_user_id AND u.is_active)
            THEN 'inactive'
        WHEN p_parent_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM messages m WHERE m.id = p_parent_id AND m.thread_id = p_thread_id)
            THEN 'bad_parent'
    END
$$;

-- A message's attachments as a JSON array (oldest first). (0004)
CREATE OR REPLACE FUNCTION chat_message_attachments(p_message_id uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY a.created_at, a.id), '[]'::jsonb)
    FROM message_attachments a WHERE a.message_id = p_message_id
$$;

-- What a send asked for, as one value: jsonb's text form is canonical (keys
-- sorted, one spelling per value), so equal requests give equal digests. (0010)
CREATE OR REPLACE FUNCTION chat_request_digest(
    p_thread_id uuid, p_parent_id uuid, p_content text, p_metadata jsonb, p_attachments jsonb
) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT sha256(convert_to(jsonb_build_object(
        'thread_id', p_thread_id,
        'parent_id', p_parent_id,
        'content', p_content,
        'metadata', p_metadata,
        'attachments', coalesce(p_attachments, '[]'::jsonb))::text, 'UTF8'))
$$;

-- The whole send in one transaction and one round trip (0004; the sender's row
-- locked before the thread's: 0008; request_id means one request: 0010). Returns
-- one row: an outcome, 'created' or 'duplicate' (a retry of request_id: the
-- original, nothing written) with the message and its attachments; or a refusal
-- ('thread_not_found', 'not_participant', 'archived', 'inactive', 'bad_parent',
-- 'request_id_reused') with NULLs.
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
    v_digest bytea;
    v_existing_thread uuid;
    v_existing_digest bytea;
    v_count bigint;
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
        v_digest := chat_request_digest(p_thread_id, p_parent_id, p_content, p_metadata,
                                        p_attachments);
        SELECT m.id, m.thread_id, m.request_digest
        INTO v_existing, v_existing_thread, v_existing_digest
        FROM messages m
        WHERE m.user_id = p_user_id AND m.request_id = p_request_id;
        IF FOUND THEN
            IF NOT EXISTS (SELECT 1 FROM thread_participants p
                           WHERE p.thread_id = p_thread_id AND p.user_id = p_user_id) THEN
                -- No retry reads a thread its sender no longer belongs to.
                v_outcome := 'not_participant';
            ELSIF v_existing_thread <> p_thread_id
                  OR (v_existing_digest IS NOT NULL AND v_existing_digest <> v_digest) THEN
                v_outcome := 'request_id_reused';
            ELSE
                v_outcome := 'duplicate';
                v_id := v_existing;
            END IF;
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
    -- The message's position, its time (after the thread's latest) and its
    -- place in the unread counters (unread.sql): chat_bump_thread counts it in the
    -- thread's message_count, the sender's read count follows below, and the
    -- triggers that would count it stand aside until then. No one else has read
    -- it: every other mark is at or before the thread's previous latest message.
    v_last_seq := chat_bump_thread(p_thread_id, 1, true);
    SELECT t.last_message_at, t.message_count INTO v_created, v_count
    FROM threads t WHERE t.id = p_thread_id;
    PERFORM set_config('chat.unread_counted', 'on', true);

    INSERT INTO messages (thread_id, user_id, content, parent_id, metadata, seq, change_seq,
                          request_id, request_digest, created_at, updated_at)
    VALUES (p_thread_id, p_user_id, p_content, p_parent_id, p_metadata, v_last_seq, v_last_seq,
            p_request_id, v_digest, v_created, v_created)
    RETURNING id INTO v_id;

    -- Attachments are listed by (created_at, id): a microsecond apiece keeps
    -- them in the order the sender gave (their ids are random).
    INSERT INTO message_attachments (message_id, url, type, name, size, metadata, created_at)
    SELECT v_id, a.value ->> 'url', a.value ->> 'type', a.value ->> 'name',
           (a.value ->> 'size')::integer, nullif(a.value -> 'metadata', 'null'::jsonb),
           v_created + (a.n - 1) * interval '1 microsecond'
    FROM jsonb_array_elements(coalesce(p_attachments, '[]'::jsonb)) WITH ORDINALITY AS a (value, n);

    -- The sender has read everything up to their own message. Their user stream
    -- shows it through the message itself, not a read_marked event (events.sql).
    PERFORM set_config('chat.read_by_own_send', 'on', true);
    UPDATE thread_participants p
    SET last_read_at = greatest(p.last_read_at, v_created),
        read_count = v_count - (
            SELECT count(*) FROM messages m
            WHERE m.thread_id = p_thread_id AND m.created_at > greatest(p.last_read_at, v_created)
              AND m.user_id <> p_user_id AND m.status <> 'deleted')
    WHERE p.thread_id = p_thread_id AND p.user_id = p_user_id;
    PERFORM set_config('chat.unread_counted', 'off', true);
    -- Only this mark move is the send's: a later one in the same transaction logs.
    PERFORM set_config('chat.read_by_own_send', 'off', true);

    RETURN QUERY SELECT 'created'::text, m.id, m.thread_id, m.user_id, m.content, m.parent_id,
        m.status, m.metadata, m.created_at, m.updated_at, m.seq, m.change_seq,
        chat_message_attachments(m.id)
    FROM messages m WHERE m.id = v_id;
END $$;
