-- Archival keeps whole threads: their participants and their messages'
-- attachments move with them, so a restored thread comes back exactly.
-- Same columns, defaults, checks and indexes as the live tables; no foreign keys.

-- migrate:up

CREATE TABLE archived_thread_participants (LIKE thread_participants INCLUDING ALL);
CREATE TABLE archived_message_attachments (LIKE message_attachments INCLUDING ALL);

-- migrate:down

DROP TABLE archived_message_attachments;
DROP TABLE archived_thread_participants;
