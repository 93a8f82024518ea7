-- A re-run's runs replace the results of the runs they run again.
--
-- `ctx.results` gathers, for a row, the newest result of each earlier stage. When a row is
-- re-run from a stage, the results its runs of that stage and the later ones had returned
-- are marked `superseded_at` (they stay in the history), so that a stage which now returns
-- None, or fails, does not hand on what it returned the first time. Not indexed: the
-- lookups that skip superseded runs filter rows they already read, and completions stay HOT.
ALTER TABLE pgstagechain.runs ADD COLUMN superseded_at timestamptz;
