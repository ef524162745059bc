-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions").
--
-- Unread counts kept as counters (migration 0014), so an inbox or a total reads
-- two integers per thread instead of counting messages:
--   threads.message_count            messages of the thread not deleted
--   thread_participants.read_count   of those, the ones the participant has read:
--                                    created at or before their read mark, or
--                                    their own
--   unread = message_count - read_count, exactly the count of others' messages
--   after the mark, not deleted (services/threads/store.py).
-- Both move in the writer's transaction, under the thread's row lock that every
-- writer of a thread's messages or read marks already holds (sends, edits and
-- deletions FOR UPDATE, MarkRead FOR SHARE, DeleteUser, `db archive`); triggers
-- lock it themselves for any other writer. Triggers, not calls in each writer,
-- so no path that changes these tables (the services, DeleteUser, `db archive`
-- and restore, a cascade, a bulk load) can skip a counter. The send counts its
-- own message in the UPDATEs it already does and tells the two triggers it
-- would fire to stand aside (chat.unread_counted, send.sql).
--
-- Archived rows hold 0: archival deletes the messages first (the counters go to
-- 0 with them), restore inserts them after the thread and its participants.

-- What participant (thread, user) has read at mark `p_mark`: the messages not
-- deleted created at or before it, or their own. Locks the thread row FOR SHARE
-- (the caller usually holds it already) so that no message of the thread
-- changes while this counts; 0 when the thread does not exist. Reads the fewer
-- rows of the two ways: with no mark, the user's own messages; with one, the
-- others' messages after it (none for a sender's mark or a MarkRead to the end).
CREATE OR REPLACE FUNCTION chat_unread_read_count(
    p_thread_id uuid, p_user_id uuid, p_mark timestamptz
) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_total bigint;
BEGIN
    SELECT t.message_count INTO v_total FROM threads t WHERE t.id = p_thread_id FOR SHARE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    IF p_mark IS NULL THEN
        RETURN (SELECT count(*) FROM messages m
                WHERE m.thread_id = p_thread_id AND m.user_id = p_user_id
                  AND m.status <> 'deleted');
    END IF;
    RETURN v_total - (SELECT count(*) FROM messages m
                      WHERE m.thread_id = p_thread_id AND m.created_at > p_mark
                        AND m.user_id <> p_user_id AND m.status <> 'deleted');
END $$;

-- A participant joins (or comes back from the archive), or their mark moves:
-- their read_count from scratch, whatever the writer put there. No mark lies
-- past the thread's latest message (MarkRead's rule, here for every writer; no
-- mark without messages), so a send's new message is read by no one but its
-- sender (send.sql counts on it).
CREATE OR REPLACE FUNCTION chat_unread_count_reader() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_latest timestamptz;
BEGIN
    SELECT t.last_message_at INTO v_latest FROM threads t WHERE t.id = NEW.thread_id FOR SHARE;
    IF v_latest IS NULL OR NEW.last_read_at > v_latest THEN
        NEW.last_read_at := v_latest;
    END IF;
    NEW.read_count := chat_unread_read_count(NEW.thread_id, NEW.user_id, NEW.last_read_at);
    RETURN NEW;
END $$;

-- Messages inserted or deleted by one statement (a transition table named
-- `changed`; TG_OP says which): each thread's message_count moves by the rows
-- not deleted. The threads are locked first, in id order, so marks stand still
-- meanwhile; a thread deleted by the statement (a cascade) has nothing left to
-- count. The participants' read_count is counted again from scratch (what
-- their marks leave unread, usually little): a participant inserted by the same
-- statement (a data-modifying WITH) may have counted some of these rows
-- already, and a bulk deletion (archival) would otherwise be matched against
-- every mark. A send's insertion does not come here (send.sql).
CREATE OR REPLACE FUNCTION chat_unread_count_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_sign bigint := CASE WHEN TG_OP = 'INSERT' THEN 1 ELSE -1 END;
    v_ids uuid[];
BEGIN
    SELECT array_agg(t.id ORDER BY t.id) INTO v_ids FROM (
        SELECT t.id FROM threads t
        WHERE t.id IN (SELECT c.thread_id FROM changed c WHERE c.status <> 'deleted')
        ORDER BY t.id
        FOR NO KEY UPDATE) t;
    IF v_ids IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE threads t SET message_count = t.message_count + v_sign * c.n
    FROM (SELECT c.thread_id, count(*) AS n FROM changed c
          WHERE c.status <> 'deleted' GROUP BY c.thread_id) c
    WHERE t.id = c.thread_id;
    UPDATE thread_participants p SET read_count = r.n
    FROM (SELECT q.thread_id, q.user_id,
                 chat_unread_read_count(q.thread_id, q.user_id, q.last_read_at) AS n
          FROM thread_participants q WHERE q.thread_id = ANY (v_ids)) r
    WHERE p.thread_id = r.thread_id AND p.user_id = r.user_id AND p.read_count <> r.n;
    RETURN NULL;
END $$;

-- One message counted in (p_delta 1) or out (-1) of its thread's counters.
CREATE OR REPLACE FUNCTION chat_unread_adjust(
    p_thread_id uuid, p_user_id uuid, p_created_at timestamptz, p_delta bigint
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE threads t SET message_count = t.message_count + p_delta WHERE t.id = p_thread_id;
    IF FOUND THEN
        UPDATE thread_participants p SET read_count = p.read_count + p_delta
        WHERE p.thread_id = p_thread_id
          AND (p.last_read_at >= p_created_at OR p.user_id = p_user_id);
    END IF;
END $$;

-- A message deleted (a tombstone), or, by hand, undeleted or moved in time,
-- author or thread: out of the counters as it was, in as it is.
CREATE OR REPLACE FUNCTION chat_unread_count_changed_message() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'deleted' THEN
        PERFORM chat_unread_adjust(OLD.thread_id, OLD.user_id, OLD.created_at, -1);
    END IF;
    IF NEW.status <> 'deleted' THEN
        PERFORM chat_unread_adjust(NEW.thread_id, NEW.user_id, NEW.created_at, 1);
    END IF;
    RETURN NULL;
END $$;

-- A new thread has no messages yet (a restored one gets them after its row).
CREATE OR REPLACE FUNCTION chat_unread_new_thread() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.message_count := 0;
    RETURN NEW;
END $$;

-- The counters of these threads from scratch, under their row locks: for loads
-- that bypass triggers (session_replication_role = replica, as the benchmark's
-- seed does) and for checking. Returns the threads recounted.
CREATE OR REPLACE FUNCTION chat_unread_recount(p_thread_ids uuid[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_count integer;
BEGIN
    PERFORM 1 FROM threads t WHERE t.id = ANY (p_thread_ids) ORDER BY t.id FOR NO KEY UPDATE;
    UPDATE threads t
    SET message_count = (SELECT count(*) FROM messages m
                         WHERE m.thread_id = t.id AND m.status <> 'deleted')
    WHERE t.id = ANY (p_thread_ids);
    GET DIAGNOSTICS v_count = ROW_COUNT;
    UPDATE thread_participants p
    SET read_count = chat_unread_read_count(p.thread_id, p.user_id, p.last_read_at)
    WHERE p.thread_id = ANY (p_thread_ids);
    RETURN v_count;
END $$;

-- The triggers (schema, kept here so each lands with its function). The two a
-- send would fire stand aside while it counts its own message (send.sql).
CREATE OR REPLACE TRIGGER trg_threads_unread_new BEFORE INSERT ON threads
    FOR EACH ROW EXECUTE FUNCTION chat_unread_new_thread();
CREATE OR REPLACE TRIGGER trg_participants_unread_join BEFORE INSERT ON thread_participants
    FOR EACH ROW EXECUTE FUNCTION chat_unread_count_reader();
CREATE OR REPLACE TRIGGER trg_participants_unread_mark
    BEFORE UPDATE OF last_read_at ON thread_participants
    FOR EACH ROW
    WHEN (OLD.last_read_at IS DISTINCT FROM NEW.last_read_at
          AND current_setting('chat.unread_counted', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION chat_unread_count_reader();
CREATE OR REPLACE TRIGGER trg_messages_unread_insert AFTER INSERT ON messages
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT
    WHEN (current_setting('chat.unread_counted', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION chat_unread_count_messages();
CREATE OR REPLACE TRIGGER trg_messages_unread_delete AFTER DELETE ON messages
    REFERENCING OLD TABLE AS changed
    FOR EACH STATEMENT
    EXECUTE FUNCTION chat_unread_count_messages();
CREATE OR REPLACE TRIGGER trg_messages_unread_update
    AFTER UPDATE OF status, created_at, user_id, thread_id ON messages
    FOR EACH ROW
    WHEN ((OLD.status = 'deleted') IS DISTINCT FROM (NEW.status = 'deleted')
          OR (OLD.status <> 'deleted'
              AND (OLD.created_at, OLD.user_id, OLD.thread_id)
                  IS DISTINCT FROM (NEW.created_at, NEW.user_id, NEW.thread_id)))
    EXECUTE FUNCTION chat_unread_count_changed_message();
