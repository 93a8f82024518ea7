-- Completing a run becomes a HOT update: no index of the ledger covers the columns a
-- completion changes (state, finished_at, and result when the handler returned nothing),
-- so the new version of the row stays on its page and no index gains an entry.
--
-- Live runs are found through their rows instead: a row (or group) at (stage, running)
-- leads to its run by `runs_row`. The uniqueness of a live claim per (row, stage) was
-- already guaranteed by the row's move to (stage, running) under its row lock.
DROP INDEX pgstagechain.runs_one_live_claim;

-- Only runs that returned something are looked up for later stages; a run that returned
-- nothing keeps `result` NULL, and an unchanged column does not stop a HOT update.
DROP INDEX pgstagechain.runs_results;
CREATE INDEX runs_results ON pgstagechain.runs (pipeline, row_key) WHERE result IS NOT NULL;

-- Recent runs (status tables, durations) by a block-range index: a summarizing index does
-- not stop HOT updates (PostgreSQL 16 and later), and runs are appended in time order.
DROP INDEX pgstagechain.runs_finished;
CREATE INDEX runs_finished ON pgstagechain.runs USING brin (finished_at)
    WITH (autosummarize = on);

-- Room on each page for the completed version of the runs inserted there.
ALTER TABLE pgstagechain.runs SET (fillfactor = 70);

-- Groups are looked up by key or by state, never by pipeline alone: each index leads
-- with what its lookup gives, so that neither can be mistaken for the other whatever
-- the (during a burst, always stale) statistics say.
ALTER TABLE pgstagechain.groups DROP CONSTRAINT groups_pkey,
    ADD PRIMARY KEY (group_key, pipeline);
DROP INDEX pgstagechain.groups_state;
CREATE INDEX groups_state ON pgstagechain.groups (step, status, pipeline);
