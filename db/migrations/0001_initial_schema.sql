-- The schema of ../shared/spec/schema.md. Deviations, each documented in db/README.md:
-- gen_random_uuid() (core since PG 13) instead of uuid-ossp's uuid_generate_v4();
-- timestamptz instead of timestamp; NOT NULL on flags, status, role and timestamps;
-- CHECK constraints on the enumerated strings; case-insensitive unique indexes on
-- users; an id tiebreaker in the message history indexes for keyset pagination.
--
-- Amended (issue 14): the down part refuses to drop tables that hold rows unless
-- run with --allow-data-loss. The up part is unchanged, so a database that applied
-- the earlier text (checksum below) accepts this one (db/README.md, "Amending an
-- applied migration").
-- migrate:supersedes 61cc73b8fd694ea7f2a24a4e2d5baa4624f7d1dcc516deef28a4fc3d617d06da

-- migrate:up

CREATE TABLE users (
    id            uuid         NOT NULL DEFAULT gen_random_uuid(),
    email         varchar(255) NOT NULL,
    username      varchar(50)  NOT NULL,
    first_name    varchar(100),
    last_name     varchar(100),
    profile_image varchar(255),
    is_active     boolean      NOT NULL DEFAULT true,
    last_login_at timestamptz,
    created_at    timestamptz  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at    timestamptz  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT users_pkey PRIMARY KEY (id),
    CONSTRAINT uq_users_email UNIQUE (email),
    CONSTRAINT uq_users_username UNIQUE (username)
);

-- Case-insensitive identity (Bob@x.io and bob@x.io are one user) and lookups.
-- text_pattern_ops also serves `lower(col) LIKE 'prefix%'` under any collation.
CREATE UNIQUE INDEX idx_users_email ON users (lower(email) text_pattern_ops);
CREATE UNIQUE INDEX idx_users_username ON users (lower(username) text_pattern_ops);

CREATE TABLE threads (
    id              uuid         NOT NULL DEFAULT gen_random_uuid(),
    name            varchar(255),
    is_direct       boolean      NOT NULL DEFAULT false,
    is_archived     boolean      NOT NULL DEFAULT false,
    last_message_at timestamptz,
    created_at      timestamptz  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at      timestamptz  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT threads_pkey PRIMARY KEY (id)
);

CREATE INDEX idx_threads_last_message ON threads (last_message_at DESC);

CREATE TABLE messages (
    id         uuid        NOT NULL DEFAULT gen_random_uuid(),
    thread_id  uuid        NOT NULL,
    user_id    uuid        NOT NULL,
    content    text        NOT NULL,
    parent_id  uuid,
    status     varchar(20) NOT NULL DEFAULT 'sent',
    metadata   jsonb,
    created_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT messages_pkey PRIMARY KEY (id),
    CONSTRAINT fk_message_thread FOREIGN KEY (thread_id)
        REFERENCES threads (id) ON DELETE CASCADE,
    CONSTRAINT fk_message_user FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT fk_message_parent FOREIGN KEY (parent_id)
        REFERENCES messages (id) ON DELETE SET NULL,
    CONSTRAINT ck_messages_status CHECK (status IN ('sent', 'edited', 'deleted'))
);

-- id breaks ties between equal timestamps so keyset pagination never skips a row.
CREATE INDEX idx_messages_thread ON messages (thread_id, created_at DESC, id DESC);
CREATE INDEX idx_messages_user ON messages (user_id, created_at DESC, id DESC);
CREATE INDEX idx_messages_parent ON messages (parent_id);
-- From the spec's example migration: JSONB containment search on metadata.
CREATE INDEX idx_messages_metadata ON messages USING gin (metadata);

CREATE TABLE thread_participants (
    thread_id    uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    role         varchar(20) NOT NULL DEFAULT 'member',
    last_read_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT thread_participants_pkey PRIMARY KEY (thread_id, user_id),
    CONSTRAINT fk_participant_thread FOREIGN KEY (thread_id)
        REFERENCES threads (id) ON DELETE CASCADE,
    CONSTRAINT fk_participant_user FOREIGN KEY (user_id)
        REFERENCES users (id) ON DELETE CASCADE,
    CONSTRAINT ck_participants_role CHECK (role IN ('owner', 'admin', 'member'))
);

CREATE INDEX idx_thread_participants_user ON thread_participants (user_id);

CREATE TABLE message_attachments (
    id         uuid         NOT NULL DEFAULT gen_random_uuid(),
    message_id uuid         NOT NULL,
    url        varchar(255) NOT NULL,
    type       varchar(50)  NOT NULL,
    name       varchar(255) NOT NULL,
    size       integer      NOT NULL,
    metadata   jsonb,
    created_at timestamptz  NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT message_attachments_pkey PRIMARY KEY (id),
    CONSTRAINT fk_attachment_message FOREIGN KEY (message_id)
        REFERENCES messages (id) ON DELETE CASCADE,
    CONSTRAINT ck_attachments_size CHECK (size >= 0)
);

CREATE INDEX idx_message_attachments ON message_attachments (message_id);

-- Data archival (spec): same columns, defaults, checks and indexes; no foreign keys,
-- so archived rows outlive the live rows they were moved from.
CREATE TABLE archived_messages (LIKE messages INCLUDING ALL);
CREATE TABLE archived_threads (LIKE threads INCLUDING ALL);

-- migrate:down

DO $$
DECLARE v_rows bigint;
BEGIN
    SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM threads)
         + (SELECT count(*) FROM messages) + (SELECT count(*) FROM thread_participants)
         + (SELECT count(*) FROM message_attachments) + (SELECT count(*) FROM archived_messages)
         + (SELECT count(*) FROM archived_threads)
    INTO v_rows;
    IF v_rows > 0 AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0001 would drop every chat table, holding % rows '
            '(users, threads, messages, participants, attachments and the archive); '
            'rerun with --allow-data-loss to drop them', v_rows;
    END IF;
END $$;

DROP TABLE archived_threads;
DROP TABLE archived_messages;
DROP TABLE message_attachments;
DROP TABLE thread_participants;
DROP TABLE messages;
DROP TABLE threads;
DROP TABLE users;
