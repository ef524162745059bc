-- Archival keeps whole threads: their participants and their messages'
-- attachments move with them, so a restored thread comes back exactly.
-- Same columns, defaults, checks and indexes as the live tables; no foreign keys.
--
-- Amended (issue 14): the down part refuses to drop archived participants or
-- attachments unless run with --allow-data-loss (it dropped them silently). The
-- up part is unchanged, so a database that applied the earlier text (checksum
-- below) accepts this one (db/README.md, "Amending an applied migration").
-- migrate:supersedes 2402e2ce4451c3971f7d05041754918af87e9caacd803cd5b8cbabf2bc4cbcf1

-- migrate:up

CREATE TABLE archived_thread_participants (LIKE thread_participants INCLUDING ALL);
CREATE TABLE archived_message_attachments (LIKE message_attachments INCLUDING ALL);

-- migrate:down

DO $$
DECLARE
    v_participants bigint;
    v_attachments bigint;
BEGIN
    SELECT count(*) INTO v_participants FROM archived_thread_participants;
    SELECT count(*) INTO v_attachments FROM archived_message_attachments;
    IF v_participants + v_attachments > 0
       AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0005 would drop the archive''s % participant(s) and '
            '% attachment(s) (restored threads would come back without them); '
            'rerun with --allow-data-loss to drop them', v_participants, v_attachments;
    END IF;
END $$;

DROP TABLE archived_message_attachments;
DROP TABLE archived_thread_participants;
