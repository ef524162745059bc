-- ListUsers' prefix search ORs four range scans and sorts the page by username;
-- the planner picks between that bitmap and walking idx_users_username with a
-- filter from the prefix selectivity it reads off each expression index's
-- histogram. With the default target (100) the sampled histogram sometimes
-- guesses a selective prefix as common, and the walk then reads the whole
-- table. A finer histogram on the four expressions keeps the estimate close.

-- migrate:up

ALTER INDEX idx_users_username ALTER COLUMN 1 SET STATISTICS 1000;
ALTER INDEX idx_users_email ALTER COLUMN 1 SET STATISTICS 1000;
ALTER INDEX idx_users_first_name ALTER COLUMN 1 SET STATISTICS 1000;
ALTER INDEX idx_users_last_name ALTER COLUMN 1 SET STATISTICS 1000;

-- migrate:down

ALTER INDEX idx_users_last_name ALTER COLUMN 1 SET STATISTICS -1;
ALTER INDEX idx_users_first_name ALTER COLUMN 1 SET STATISTICS -1;
ALTER INDEX idx_users_email ALTER COLUMN 1 SET STATISTICS -1;
ALTER INDEX idx_users_username ALTER COLUMN 1 SET STATISTICS -1;
