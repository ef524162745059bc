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
--
-- Amended (issue 14) so that `down` then `up` works on populated tables:
-- * the up part numbers existing messages before setting NOT NULL: per thread
--   (live and archived alike), every message's creation at created_at and, for a
--   message changed since (updated_at later than created_at), its latest change
--   at updated_at, are numbered 1, 2, ... in time order (creation first on a tie,
--   then by id); seq is the creation's number, change_seq the latest event's, and
--   the thread's last_seq the highest number (0 without messages).
-- * the down part refuses, unless run with --allow-data-loss, to drop what that
--   numbering would not give back: any request_id (what a retry is matched
--   against), and positions that differ from it (a message edited twice, a
--   removal, or an edit stamped out of order leave gaps: stream cursors handed
--   out would point elsewhere).
-- The schema built is unchanged, so a database that applied the earlier text
-- (checksum below) accepts this one (db/README.md, "Amending an applied migration").
-- migrate:supersedes ef28b7aac94572f8edf700bce2f131edea5e9cec511ca4f8bf8579a78aa66ec9

-- migrate:up

ALTER TABLE threads ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
ALTER TABLE archived_threads ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;

ALTER TABLE messages ADD COLUMN seq bigint;
ALTER TABLE messages ADD COLUMN change_seq bigint;
ALTER TABLE messages ADD COLUMN request_id uuid;
ALTER TABLE archived_messages ADD COLUMN seq bigint;
ALTER TABLE archived_messages ADD COLUMN change_seq bigint;
ALTER TABLE archived_messages ADD COLUMN request_id uuid;

-- Positions for the rows already there (see the header; the down part checks
-- positions against the same numbering).
CREATE TEMPORARY TABLE chat_positions ON COMMIT DROP AS
WITH all_messages AS (
    SELECT false AS archived, thread_id, id, created_at, updated_at FROM messages
    UNION ALL
    SELECT true, thread_id, id, created_at, updated_at FROM archived_messages
), events AS (
    SELECT archived, thread_id, id, created_at AS at, 0 AS kind FROM all_messages
    UNION ALL
    SELECT archived, thread_id, id, updated_at, 1 FROM all_messages
    WHERE updated_at <> created_at
), numbered AS (
    SELECT archived, thread_id, id, kind,
           row_number() OVER (PARTITION BY archived, thread_id ORDER BY at, kind, id) AS n
    FROM events
)
SELECT archived, thread_id, id, max(n) FILTER (WHERE kind = 0) AS seq, max(n) AS change_seq
FROM numbered
GROUP BY archived, thread_id, id;

UPDATE messages m SET seq = p.seq, change_seq = p.change_seq
FROM chat_positions p WHERE NOT p.archived AND p.id = m.id;
UPDATE archived_messages m SET seq = p.seq, change_seq = p.change_seq
FROM chat_positions p WHERE p.archived AND p.id = m.id;
UPDATE threads t SET last_seq = p.last_seq
FROM (SELECT thread_id, max(change_seq) AS last_seq FROM chat_positions
      WHERE NOT archived GROUP BY thread_id) p
WHERE p.thread_id = t.id;
UPDATE archived_threads t SET last_seq = p.last_seq
FROM (SELECT thread_id, max(change_seq) AS last_seq FROM chat_positions
      WHERE archived GROUP BY thread_id) p
WHERE p.thread_id = t.id;

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

-- Why a send must be refused, or NULL when it may go ahead.
CREATE FUNCTION chat_send_refusal(
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

-- A message's attachments as a JSON array (oldest first).
CREATE FUNCTION chat_message_attachments(p_message_id uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(to_jsonb(a) ORDER BY a.created_at, a.id), '[]'::jsonb)
    FROM message_attachments a WHERE a.message_id = p_message_id
$$;

-- The whole send in one transaction and one round trip. Returns one row: an
-- outcome, 'created' or 'duplicate' (a retry of request_id: the original, nothing
-- written) with the message and its attachments; or a refusal
-- ('thread_not_found', 'not_participant', 'archived', 'inactive', 'bad_parent')
-- with NULLs.
CREATE FUNCTION chat_send_message(
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

-- migrate:down

DO $$
DECLARE
    v_requests bigint;
    v_positions bigint;
BEGIN
    SELECT (SELECT count(*) FROM messages WHERE request_id IS NOT NULL)
         + (SELECT count(*) FROM archived_messages WHERE request_id IS NOT NULL)
    INTO v_requests;
    -- Messages and threads whose positions differ from the up part's numbering.
    WITH all_messages AS (
        SELECT false AS archived, thread_id, id, created_at, updated_at, seq, change_seq
        FROM messages
        UNION ALL
        SELECT true, thread_id, id, created_at, updated_at, seq, change_seq
        FROM archived_messages
    ), events AS (
        SELECT archived, thread_id, id, created_at AS at, 0 AS kind FROM all_messages
        UNION ALL
        SELECT archived, thread_id, id, updated_at, 1 FROM all_messages
        WHERE updated_at <> created_at
    ), numbered AS (
        SELECT archived, thread_id, id, kind,
               row_number() OVER (PARTITION BY archived, thread_id ORDER BY at, kind, id) AS n
        FROM events
    ), rebuilt AS (
        SELECT archived, thread_id, id, max(n) FILTER (WHERE kind = 0) AS seq,
               max(n) AS change_seq
        FROM numbered
        GROUP BY archived, thread_id, id
    ), rebuilt_threads AS (
        SELECT archived, thread_id, max(change_seq) AS last_seq
        FROM rebuilt GROUP BY archived, thread_id
    ), all_threads AS (
        SELECT false AS archived, id, last_seq FROM threads
        UNION ALL
        SELECT true, id, last_seq FROM archived_threads
    )
    SELECT (SELECT count(*) FROM all_messages m
            JOIN rebuilt r ON r.archived = m.archived AND r.id = m.id
            WHERE (r.seq, r.change_seq) IS DISTINCT FROM (m.seq, m.change_seq))
         + (SELECT count(*) FROM all_threads t
            LEFT JOIN rebuilt_threads r ON r.archived = t.archived AND r.thread_id = t.id
            WHERE coalesce(r.last_seq, 0) IS DISTINCT FROM t.last_seq)
    INTO v_positions;
    IF v_requests + v_positions > 0
       AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0004 would drop % request_id(s) and the stream '
            'positions of % message(s) or thread(s) that the up part would not number '
            'the same (stream cursors would point elsewhere); '
            'rerun with --allow-data-loss to drop them', v_requests, v_positions;
    END IF;
END $$;

-- squawk-ignore ban-drop-function
DROP FUNCTION chat_send_message(uuid, uuid, text, uuid, jsonb, uuid, jsonb);
-- squawk-ignore ban-drop-function
DROP FUNCTION chat_message_attachments(uuid);
-- squawk-ignore ban-drop-function
DROP FUNCTION chat_send_refusal(uuid, uuid, uuid, boolean);
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
