-- Retention: deleting finished runs past their window, in batches that walk the ledger by
-- run id (oldest first), each batch one short statement. A batch reads `batch` runs of
-- any pipeline (the primary key serves; no index on the columns a completion changes, so
-- completions stay HOT updates), judges those of this pipeline and deletes the doomed
-- ones, locking only them, and skipping any another transaction holds.
--
-- Which runs go (docs/operations.md, "Ledger retention"): finished (not running, no
-- retry pending), older than their window (`keep_failed` for runs that did not succeed
-- and for every run of a row or group that failed for good, `keep_succeeded` for the
-- others), of a row or group that is settled, and not the runs at the step where a row
-- or group failed (they say why). A row is settled when it is done at the end of its
-- chain, or failed for good; a member of a group only once it is at rest (done at the
-- step its group stage follows, or failed) and its group is done at the end of the group
-- chain or failed. A run whose row or group no longer exists, or whose stage the
-- pipeline no longer has, is read by nothing: only its window counts.

-- name: prune_runs
WITH {prune_judge_runs},
doomed AS (
    SELECT r.id FROM pgstagechain.runs r
    WHERE r.id = ANY(ARRAY(SELECT j.id FROM judged j WHERE j.doomed))
      AND r.state <> 'running' AND r.retry_at IS NULL
    FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM pgstagechain.runs r WHERE r.id = ANY(ARRAY(SELECT d.id FROM doomed d))
    RETURNING r.state
)
SELECT b.*, (SELECT coalesce(jsonb_object_agg(c.state, c.n), '{{}}'::jsonb)
             FROM (SELECT state, count(*) AS n FROM gone GROUP BY state) c) AS states
FROM {prune_batch_end} b

-- name: prune_runs_count
-- The same batch, counted and not deleted (a dry run).
WITH {prune_judge_runs}
SELECT b.*, (SELECT coalesce(jsonb_object_agg(c.state, c.n), '{{}}'::jsonb)
             FROM (SELECT state, count(*) AS n FROM judged WHERE doomed GROUP BY state) c)
             AS states
FROM {prune_batch_end} b

-- fragment: prune_batch_end
-- How far the batch got: the last run id read, and whether it read runs younger than the
-- shorter window (run ids follow start times, so every later run is younger still).
(SELECT count(*) AS scanned, max(s.id) AS last_id,
        coalesce(max(s.started_at) > statement_timestamp() - %(keep_succeeded)s::interval,
                 true) AS young
 FROM scanned s)

-- fragment: prune_judge_runs
scanned AS (
    SELECT r.id, r.pipeline, r.stage, r.row_key, r.state, r.retry_at, r.started_at,
           r.finished_at
    FROM pgstagechain.runs r
    WHERE r.id > %(after)s
    ORDER BY r.id
    LIMIT %(batch)s
),
judged AS (
    SELECT s.id, s.state,
           s.finished_at < statement_timestamp()
               - CASE WHEN s.state = 'succeeded' AND NOT coalesce(pos.failed, false)
                      THEN %(keep_succeeded)s::interval ELSE %(keep_failed)s::interval END
           AND coalesce(pos.settled, true)
           AND NOT coalesce(pos.failed AND s.stage = pos.step, false) AS doomed
    FROM scanned s
    LEFT JOIN LATERAL (
        SELECT bool_and(p.settled) AS settled, bool_or(p.failed) AS failed,
               min(p.step) AS step
        FROM ({prune_row_position} UNION ALL {prune_group_position}) p
    ) pos ON true
    WHERE s.pipeline = %(pipeline)s AND s.state <> 'running' AND s.retry_at IS NULL
      AND s.finished_at < statement_timestamp() - %(keep_succeeded)s::interval
)

-- fragment: prune_row_position
-- The row of a row stage's run, by its key (the CASE keeps the cast away from runs of
-- group stages, whose keys are group keys).
SELECT coalesce(CASE
           WHEN t.{step} = ANY(%(member_steps)s::text[]) THEN
               (t.{status} = %(failed)s
                OR (t.{status} = %(done)s AND t.{step} = ANY(%(fan_in_steps)s::text[])))
               AND coalesce((SELECT {prune_group_settled} FROM pgstagechain.groups g
                             WHERE g.group_key = {group_expr} AND g.pipeline = %(pipeline)s),
                            false)
           ELSE t.{status} = %(failed)s
                OR (t.{status} = %(done)s AND t.{step} = ANY(%(end_steps)s::text[]))
       END, false) AS settled,
       coalesce(t.{status} = %(failed)s, false) AS failed, t.{step}::text AS step
FROM {table} t
WHERE t.{key} = CASE WHEN s.stage = ANY(%(row_stages)s::text[]) THEN s.row_key::{key_type} END

-- fragment: prune_group_position
SELECT {prune_group_settled}, g.status = 'failed', g.step
FROM pgstagechain.groups g
WHERE s.stage = ANY(%(group_stages)s::text[]) AND g.group_key = s.row_key
  AND g.pipeline = %(pipeline)s

-- fragment: prune_group_settled
(g.status = 'failed' OR (g.status = 'done' AND g.step = ANY(%(end_group_steps)s::text[])))

-- name: prune_lock
-- One pruner at a time per pipeline, whichever worker or command it is.
SELECT pg_try_advisory_lock(hashtextextended('pgstagechain-prune:' || %(pipeline)s, 0))

-- name: prune_unlock
SELECT pg_advisory_unlock(hashtextextended('pgstagechain-prune:' || %(pipeline)s, 0))
