-- Placeholder reserved for its service issue; replaced before it is applied anywhere.

-- migrate:up
SELECT 1;

-- migrate:down
SELECT 1;
