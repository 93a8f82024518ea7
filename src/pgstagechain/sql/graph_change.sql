-- Changing the stage graph of an installed pipeline: where its rows and groups stand at the
-- steps the change touches, who is still at work there, and the moves `--map` asks for.
-- Everything here runs in migrate's transaction, under the pipeline's install lock.

-- name: positions_of_rows
-- how many rows stand at each (step, status) of the given steps, for the pipeline's statuses
SELECT t.{step}, t.{status}, count(*) FROM {table} t
WHERE t.{step} = ANY(%(steps)s::text[])
  AND t.{status} IN (%(done)s, %(running)s, %(failed)s)
GROUP BY 1, 2

-- name: positions_of_groups
SELECT g.step, g.status, count(*) FROM pgstagechain.groups g
WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(steps)s::text[])
GROUP BY 1, 2

-- name: live_runs_of_rows
-- Runs still at work at the given stages (lease not run out), found through their rows,
-- by worker: an old worker still running them would finish them by the old graph.
SELECT r.stage, r.worker_id, count(*) FROM {table} t
JOIN pgstagechain.runs r
  ON r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = t.{step}
WHERE t.{step} = ANY(%(steps)s::text[]) AND t.{status} = %(running)s
  AND r.state = 'running' AND r.lease_until > clock_timestamp()
GROUP BY 1, 2

-- name: live_runs_of_groups
SELECT r.stage, r.worker_id, count(*) FROM pgstagechain.groups g
JOIN pgstagechain.runs r
  ON r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = g.step
WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(steps)s::text[]) AND g.status = 'running'
  AND r.state = 'running' AND r.lease_until > clock_timestamp()
GROUP BY 1, 2

-- name: map_rows
-- Rows at a step the new graph no longer has, moved to the step they were mapped to: done
-- and failed keep their status; running goes back to (`rerun_from`, done) so the mapped
-- stage runs again, after its run is closed (`cancelled`, with the reason: a late
-- completion then finds nothing) or its pending retry dropped. One statement, in migrate's
-- transaction with the new trigger, so no row is ever between two graphs.
WITH held AS (
    SELECT t.{key}::text AS key FROM {table} t
    WHERE t.{step} = %(old)s AND t.{status} = %(running)s
),
{close_held_runs},
moved AS (
    UPDATE {table} t
    SET {step} = CASE WHEN t.{status} = %(running)s THEN %(rerun_from)s ELSE %(new)s END,
        {status} = CASE WHEN t.{status} = %(running)s THEN %(done)s ELSE t.{status} END
    WHERE t.{step} = %(old)s AND t.{status} IN (%(done)s, %(running)s, %(failed)s)
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM closed), (SELECT count(*) FROM dropped)

-- name: map_groups
WITH held AS (
    SELECT g.group_key AS key FROM pgstagechain.groups g
    WHERE g.pipeline = %(pipeline)s AND g.step = %(old)s AND g.status = 'running'
),
{close_held_runs},
moved AS (
    UPDATE pgstagechain.groups g
    SET step = CASE WHEN g.status = 'running' THEN %(rerun_from)s ELSE %(new)s END,
        status = CASE WHEN g.status = 'running' THEN 'done' ELSE g.status END,
        updated_at = clock_timestamp()
    WHERE g.pipeline = %(pipeline)s AND g.step = %(old)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM closed), (SELECT count(*) FROM dropped)

-- name: rename_runs
-- A stage renamed: its runs take the new name, so that later stages find its results under
-- it (`ctx.results`) and the status counts them.
UPDATE pgstagechain.runs SET stage = %(new)s WHERE pipeline = %(pipeline)s AND stage = %(old)s

-- fragment: close_held_runs
-- The runs of OLD on the rows (groups) in `held`: a live one (its worker is dead: migrate
-- refuses while one is not) closed as cancelled, a pending retry dropped, each with the
-- reason, so that a completion that comes late is refused by its token.
closed AS (
    UPDATE pgstagechain.runs r SET state = 'cancelled', finished_at = clock_timestamp(),
                                   error = %(reason)s
    FROM held
    WHERE r.pipeline = %(pipeline)s AND r.row_key = held.key AND r.stage = %(old)s
      AND r.state = 'running'
    RETURNING r.id
),
dropped AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL,
                                   error = concat_ws(E'\n', r.error, %(reason)s)
    FROM held
    WHERE r.pipeline = %(pipeline)s AND r.row_key = held.key AND r.stage = %(old)s
      AND r.retry_at IS NOT NULL
    RETURNING r.id
)
