-- Repeatable: `python -m db up` re-applies this file when its text changes
-- (db/README.md, "Server-side functions"). Moved from the migrations named below,
-- bodies unchanged.

-- Rows written without positions (bulk loads, tests) get them from the thread
-- counter under its row lock, like a send; sends set them explicitly. (0004; the
-- trigger trg_messages_assign_seq itself is schema and stays in 0004.)
CREATE OR REPLACE FUNCTION chat_assign_message_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.seq IS NULL THEN
        UPDATE threads SET last_seq = last_seq + 1 WHERE id = NEW.thread_id
        RETURNING last_seq INTO NEW.seq;
    END IF;
    NEW.change_seq := coalesce(NEW.change_seq, NEW.seq);
    RETURN NEW;
END $$;
