-- One log of everything that happens in threads, read by user streams
-- (StreamUserEvents; services/messages/README.md, "User streams").
--
-- A writer appends a row to thread_events in its own transaction, under the
-- thread's row lock (the triggers in db/functions/events.sql): messages created,
-- edited, deleted or removed; participants joining, leaving, changing role or
-- moving their read mark; threads renamed or (un)archived. The row gets its
-- `position` only after it committed, from one sequencer at a time
-- (chat_sequence_events, holding event_log's row), in id order: positions are
-- dense, never seen out of order by a reader, and follow commit order for any
-- two events of one thread. No notification is sent inside the writer's
-- transaction; the sequencer's own transaction notifies `chat_log`.
--
-- Rows are kept for the retention period (event_log.retained_after: cursors
-- at or after it resume; older ones are CURSOR_EXPIRED). There is no foreign key
-- to threads: a thread's events, up to its deletion, outlive it for the streams
-- that have yet to read them.
--
-- squawk: both tables are new and empty.

-- migrate:up

CREATE TABLE thread_events (
    id bigint GENERATED ALWAYS AS IDENTITY,
    position bigint,
    thread_id uuid NOT NULL,
    kind text NOT NULL,
    user_id uuid,
    message_id uuid,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_thread_events PRIMARY KEY (id),
    CONSTRAINT ck_thread_events_kind CHECK (kind IN (
        'message_created', 'message_updated', 'message_deleted',
        'participant_joined', 'participant_left', 'participant_updated',
        'thread_updated', 'read_marked'))
);
-- The log in order (live fetches, pruning); a position is given once. Both
-- position indexes are partial: a writer's insert (position NULL) touches
-- neither, only the sequencer's numbering does, off the writer's path.
CREATE UNIQUE INDEX idx_thread_events_position ON thread_events (position)
    WHERE position IS NOT NULL;
-- One thread's events after a position (a resumed stream's replay).
CREATE INDEX idx_thread_events_thread ON thread_events (thread_id, position)
    WHERE position IS NOT NULL;
-- The sequencer's queue: committed events without a position yet.
CREATE INDEX idx_thread_events_unsequenced ON thread_events (id) WHERE position IS NULL;
-- One user's membership and read-mark events (membership at a past position).
CREATE INDEX idx_thread_events_member ON thread_events (user_id, id) WHERE user_id IS NOT NULL;

CREATE TABLE event_log (
    singleton boolean NOT NULL DEFAULT true,
    last_position bigint NOT NULL DEFAULT 0,
    retained_after bigint NOT NULL DEFAULT 0,
    CONSTRAINT pk_event_log PRIMARY KEY (singleton),
    CONSTRAINT ck_event_log_singleton CHECK (singleton)
);
INSERT INTO event_log DEFAULT VALUES;

-- migrate:down

DO $$
DECLARE v_rows bigint;
BEGIN
    SELECT count(*) INTO v_rows FROM thread_events;
    IF v_rows > 0 AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0013 would drop % user stream event(s) (thread_events: '
            'every user stream cursor would then expire); '
            'rerun with --allow-data-loss to drop them', v_rows;
    END IF;
END $$;

-- The triggers db/functions/events.sql made write to thread_events.
DROP TRIGGER IF EXISTS trg_messages_log ON messages;
DROP TRIGGER IF EXISTS trg_message_removals_log ON message_removals;
DROP TRIGGER IF EXISTS trg_participants_log ON thread_participants;
DROP TRIGGER IF EXISTS trg_participants_change_log ON thread_participants;
DROP TRIGGER IF EXISTS trg_threads_log ON threads;
DROP TABLE event_log;
DROP TABLE thread_events;
