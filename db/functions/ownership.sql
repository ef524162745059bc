-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions"). Moved from the migrations named below,
-- bodies unchanged.

-- No ownerless group thread (0011): if no active owner other than the leaving
-- user remains, the remaining participant who is active, an admin rather than a
-- member, and the longest in the thread (then the smallest user id) becomes an
-- owner, under the thread row lock.
CREATE OR REPLACE FUNCTION chat_ensure_owner(p_thread_id uuid, p_leaving uuid) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_candidate uuid;
    v_candidate_active boolean;
BEGIN
    PERFORM 1 FROM threads t WHERE t.id = p_thread_id AND NOT t.is_direct FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF EXISTS (
        SELECT 1 FROM thread_participants o JOIN users u ON u.id = o.user_id
        WHERE o.thread_id = p_thread_id AND o.role = 'owner' AND u.is_active
          AND o.user_id IS DISTINCT FROM p_leaving
    ) THEN
        RETURN NULL;
    END IF;
    SELECT o.user_id, u.is_active INTO v_candidate, v_candidate_active
    FROM thread_participants o JOIN users u ON u.id = o.user_id
    WHERE o.thread_id = p_thread_id AND o.role <> 'owner'
      AND o.user_id IS DISTINCT FROM p_leaving
    ORDER BY u.is_active DESC, o.role = 'admin' DESC, o.created_at, o.user_id
    LIMIT 1;
    IF v_candidate IS NULL THEN
        RETURN NULL;
    END IF;
    IF NOT v_candidate_active AND EXISTS (
        SELECT 1 FROM thread_participants o
        WHERE o.thread_id = p_thread_id AND o.role = 'owner'
          AND o.user_id IS DISTINCT FROM p_leaving
    ) THEN
        RETURN NULL;  -- an inactive owner remains; promoting another inactive user adds nothing
    END IF;
    UPDATE thread_participants SET role = 'owner'
    WHERE thread_id = p_thread_id AND user_id = v_candidate;
    RETURN v_candidate;
END $$;

-- A user going away (DeleteUser, or UpdateUser is_active=false) first locks their
-- own row, then every thread they belong to or wrote in, in one pass in id order.
-- Two departures, or a departure and a membership change (which locks the users
-- it names before the thread: services/threads/store.py LOCK_USERS), then take
-- their locks in one order and cannot deadlock; and a departure that could be
-- chosen as a group's next owner waits for the other departure to commit, then
-- sees it.
CREATE OR REPLACE FUNCTION chat_lock_departure(p_user_id uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM users u WHERE u.id = p_user_id FOR UPDATE;
    PERFORM 1 FROM threads t
    WHERE t.id IN (SELECT p.thread_id FROM thread_participants p WHERE p.user_id = p_user_id
                   UNION
                   SELECT m.thread_id FROM messages m WHERE m.user_id = p_user_id)
    ORDER BY t.id
    FOR UPDATE;
END $$;

-- Every group `p_user_id` belongs to gets another owner if it needs one (they may
-- have been made owner by a departure that committed while they waited), after
-- chat_lock_departure. Returns how many owners were made. Each statement below
-- reads what committed before it, so nothing decided under the locks is stale.
CREATE OR REPLACE FUNCTION chat_hand_on_ownership(p_user_id uuid) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_thread uuid;
    v_promoted integer := 0;
BEGIN
    PERFORM chat_lock_departure(p_user_id);
    FOR v_thread IN
        SELECT p.thread_id FROM thread_participants p
        JOIN threads t ON t.id = p.thread_id
        WHERE p.user_id = p_user_id AND NOT t.is_direct
        ORDER BY p.thread_id
    LOOP
        IF chat_ensure_owner(v_thread, p_user_id) IS NOT NULL THEN
            v_promoted := v_promoted + 1;
        END IF;
    END LOOP;
    RETURN v_promoted;
END $$;
