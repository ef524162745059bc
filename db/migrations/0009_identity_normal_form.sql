-- One identity per person (issue 14): emails and usernames are stored in Unicode
-- NFKC form, which must be ASCII, and compared ignoring ASCII case by the unique
-- indexes idx_users_email / idx_users_username on lower(...) (unchanged). The
-- services validate new values (services/users/validation.py); this brings the
-- rows written before to that form.
--
-- A row whose NFKC form is ASCII, matches the API's pattern and collides with no
-- other row (lower() of its form equals no other row's value nor another row's
-- form) is rewritten to its NFKC form. Every other row that is not already in
-- form is left exactly as it is and recorded in user_identity_conflicts, with
-- the account it collides with: accounts are never merged, renamed to something
-- new or deleted here. An operator resolves each (UpdateUser validates the new
-- value) and may then delete its report row. Reasons:
--   not_ascii  the NFKC form is not ASCII (another script's look-alike, İ, ß, ...)
--   invalid    the NFKC form is ASCII but not a valid email / username (pattern,
--              length: NFKC may lengthen a value)
--   collision  the NFKC form is valid but another account holds it (ignoring
--              case) or would hold it too; conflicting_user_id names one
--
-- The down part keeps the rewritten values (they are valid before 0009 too) and
-- drops the report table; it refuses while the table has rows (their loss is
-- data loss) unless run with `python -m db down --allow-data-loss`.

-- migrate:up

-- ASCII case-insensitivity is lower() of the database's ctype; a Turkish one
-- lowers 'I' to dotless 'ı', and Info@ and info@ would be two accounts.
DO $$
BEGIN
    IF lower('ABCDEFGHIJKLMNOPQRSTUVWXYZ') <> 'abcdefghijklmnopqrstuvwxyz' THEN
        RAISE EXCEPTION 'lower() does not lower ASCII letters to ASCII in this database (ctype %); '
            'identities need a ctype whose lower() of A-Z is a-z', current_setting('lc_ctype');
    END IF;
END
$$;

CREATE TABLE user_identity_conflicts (
    id                  bigint       GENERATED ALWAYS AS IDENTITY,
    user_id             uuid         NOT NULL,
    field               text         NOT NULL,
    value               text         NOT NULL,
    normal_form         text         NOT NULL,
    reason              text         NOT NULL,
    conflicting_user_id uuid,
    found_at            timestamptz  NOT NULL DEFAULT now(),
    CONSTRAINT user_identity_conflicts_pkey PRIMARY KEY (id),
    CONSTRAINT ck_identity_conflicts_field CHECK (field IN ('email', 'username')),
    CONSTRAINT ck_identity_conflicts_reason
        CHECK (reason IN ('not_ascii', 'invalid', 'collision'))
);

-- No write to users between the scan and the rewrite (reads go on): the report
-- then describes exactly the rows left as they were.
LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;

-- Every email and username not in identity form: its NFKC form differs, is not
-- ASCII, or fails the API's pattern (services/users/validation.py: an RFC 5321
-- dot-atom local part of at most 64 characters and DNS labels, at most 255 in
-- all; 3-50 of [A-Za-z0-9_.-]). `reason` is set for those that cannot be
-- rewritten; the rest are rewritten below unless they collide.
CREATE TEMPORARY TABLE identity_candidates ON COMMIT DROP AS
SELECT id, field, value, normal_form, created_at,
       CASE WHEN NOT ascii THEN 'not_ascii' WHEN NOT valid THEN 'invalid' END AS reason,
       NULL::uuid AS conflicting_user_id
FROM (
    SELECT id, field, value, normal_form, created_at, ascii,
           ascii AND CASE field
               WHEN 'email' THEN
                   char_length(normal_form) <= 255
                   AND char_length(split_part(normal_form, '@', 1)) <= 64
                   AND normal_form ~ ('^[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+'
                                      '(\.[A-Za-z0-9!#$%&''*+/=?^_`{|}~-]+)*'
                                      '@[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
                                      '(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$')
               ELSE normal_form ~ '^[A-Za-z0-9_.-]{3,50}$'
           END AS valid
    FROM (
        SELECT u.id, f.field, f.value, n.normal_form, u.created_at,
               octet_length(n.normal_form) = char_length(n.normal_form) AS ascii
        FROM users u
        CROSS JOIN LATERAL (VALUES ('email', u.email::text), ('username', u.username::text))
            AS f (field, value)
        CROSS JOIN LATERAL (SELECT normalize(f.value, NFKC) AS normal_form) AS n
    ) normalised
) checked
WHERE NOT (valid AND normal_form = value);

-- A form another row already holds (its current value, ignoring case), or that
-- another candidate would take too: none of them is rewritten. One statement per
-- field, so each probe of users is a lookup in idx_users_email / idx_users_username.
UPDATE identity_candidates c SET reason = 'collision', conflicting_user_id = (
    SELECT other.id FROM (
        SELECT u.id, u.created_at FROM users u
        WHERE lower(u.email) = lower(c.normal_form) AND u.id <> c.id
        UNION ALL
        SELECT o.id, o.created_at FROM identity_candidates o
        WHERE o.field = 'email' AND o.reason IS NULL AND o.id <> c.id
          AND lower(o.normal_form) = lower(c.normal_form)
    ) other
    ORDER BY other.created_at, other.id
    LIMIT 1
)
WHERE c.field = 'email' AND c.reason IS NULL
  AND (EXISTS (SELECT 1 FROM users u
               WHERE lower(u.email) = lower(c.normal_form) AND u.id <> c.id)
       OR EXISTS (SELECT 1 FROM identity_candidates o
                  WHERE o.field = 'email' AND o.reason IS NULL AND o.id <> c.id
                    AND lower(o.normal_form) = lower(c.normal_form)));

UPDATE identity_candidates c SET reason = 'collision', conflicting_user_id = (
    SELECT other.id FROM (
        SELECT u.id, u.created_at FROM users u
        WHERE lower(u.username) = lower(c.normal_form) AND u.id <> c.id
        UNION ALL
        SELECT o.id, o.created_at FROM identity_candidates o
        WHERE o.field = 'username' AND o.reason IS NULL AND o.id <> c.id
          AND lower(o.normal_form) = lower(c.normal_form)
    ) other
    ORDER BY other.created_at, other.id
    LIMIT 1
)
WHERE c.field = 'username' AND c.reason IS NULL
  AND (EXISTS (SELECT 1 FROM users u
               WHERE lower(u.username) = lower(c.normal_form) AND u.id <> c.id)
       OR EXISTS (SELECT 1 FROM identity_candidates o
                  WHERE o.field = 'username' AND o.reason IS NULL AND o.id <> c.id
                    AND lower(o.normal_form) = lower(c.normal_form)));

UPDATE users u SET email = c.normal_form
FROM identity_candidates c
WHERE c.id = u.id AND c.field = 'email' AND c.reason IS NULL;

UPDATE users u SET username = c.normal_form
FROM identity_candidates c
WHERE c.id = u.id AND c.field = 'username' AND c.reason IS NULL;

INSERT INTO user_identity_conflicts (user_id, field, value, normal_form, reason,
                                     conflicting_user_id)
SELECT id, field, value, normal_form, reason, conflicting_user_id
FROM identity_candidates
WHERE reason IS NOT NULL
ORDER BY field, created_at, id;

DO $$
DECLARE
    rewritten bigint;
    reported bigint;
BEGIN
    SELECT count(*) FILTER (WHERE reason IS NULL), count(*) FILTER (WHERE reason IS NOT NULL)
    INTO rewritten, reported
    FROM identity_candidates;
    RAISE NOTICE '0009: % emails/usernames rewritten to NFKC; % left as they were and '
        'recorded in user_identity_conflicts', rewritten, reported;
END
$$;

-- migrate:down

DO $$
DECLARE
    reported bigint;
BEGIN
    SELECT count(*) INTO reported FROM user_identity_conflicts;
    IF reported > 0 AND current_setting('chat.allow_data_loss', true) IS DISTINCT FROM 'on' THEN
        RAISE EXCEPTION 'rolling back 0009 would drop user_identity_conflicts (% rows: accounts '
            'whose email or username 0009 could not bring to identity form); resolve them, or '
            'rerun with --allow-data-loss to drop the report', reported;
    END IF;
END
$$;

DROP TABLE user_identity_conflicts;
