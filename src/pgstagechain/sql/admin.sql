-- Operating a pipeline: where the rows are, what happened to one, and putting things right.
-- `retry` and `cancel` are single statements, so they race safely with running workers.

-- name: now
SELECT clock_timestamp()

-- name: row_counts
SELECT t.{step} AS step, t.{status} AS status, count(*) AS n
FROM {table} t
WHERE t.{step} = ANY(%(steps)s::text[])
GROUP BY 1, 2

-- name: group_counts
SELECT step, status, count(*) AS n,
       min(updated_at) FILTER (WHERE status = 'done') AS oldest_done
FROM pgstagechain.groups
WHERE pipeline = %(pipeline)s
GROUP BY 1, 2

-- name: row_live_counts
-- Rows at the given (step, status) pairs only, each pair counted on its own range of the
-- state index: the cost follows the rows waiting, running or failed, not the finished ones.
SELECT p.step, p.status,
       (SELECT count(*) FROM {table} t WHERE t.{step} = p.step AND t.{status} = p.status) AS n
FROM (SELECT DISTINCT * FROM unnest(%(steps)s::text[], %(statuses)s::text[])) AS p(step, status)

-- name: group_live_counts
-- Groups waiting for (`done` at a step in `afters`), running or failed at a group stage, by
-- the state index; planned with the values at hand, so the finished groups are never read.
SELECT g.step, g.status, count(*) AS n,
       min(g.updated_at) FILTER (WHERE g.status = 'done') AS oldest_done
FROM pgstagechain.groups g
WHERE g.pipeline = %(pipeline)s
  AND ((g.status = 'done' AND g.step = ANY(%(afters)s::text[]))
       OR (g.status IN ('running', 'failed') AND g.step = ANY(%(stages)s::text[])))
GROUP BY 1, 2

-- name: row_oldest_waiting
-- When did the oldest waiting row reach (after, done)? Its latest run of the previous
-- stage finished then; start steps are set from outside and leave no trace here.
SELECT w.after, (
    SELECT min(last.finished_at) FROM (
        SELECT (SELECT max(r.finished_at) FROM pgstagechain.runs r
                WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text
                  AND r.stage = w.after) AS finished_at
        FROM {table} t
        WHERE t.{step} = w.after AND t.{status} = %(done)s
    ) last
) AS oldest
FROM unnest(%(afters)s::text[]) AS w(after)

-- name: recent_runs
-- Runs of each stage that finished within the window: how they ended, and how long they took.
-- statement_timestamp(), not clock_timestamp(): a stable bound is one the block-range
-- index on finished_at can use (a volatile one reads the whole ledger).
SELECT stage,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'expired') AS expired,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at)) AS p95
FROM pgstagechain.runs
WHERE pipeline = %(pipeline)s AND finished_at IS NOT NULL
  AND finished_at > statement_timestamp() - %(window)s * interval '1 second'
  AND stage = ANY(%(stages)s::text[])
GROUP BY stage

-- name: pending_retries
SELECT stage, count(*) AS n FROM pgstagechain.runs
WHERE retry_at IS NOT NULL AND pipeline = %(pipeline)s
GROUP BY stage

-- name: failures
-- Rows and groups that stopped at a failed stage, each with the error of its latest run
-- there; the most recent first. `groups` (NULL: all) keeps those of the given groups;
-- `row_stages` and `group_stages` name the stages to look at.
SELECT * FROM (
    SELECT 'row' AS level, t.{key}::text AS key, {group_expr} AS group_key, t.{step} AS stage,
           last.error, last.finished_at, last.attempt
    FROM {table} t
    LEFT JOIN LATERAL (
        SELECT r.error, r.finished_at, r.attempt FROM pgstagechain.runs r
        WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = t.{step}
        ORDER BY r.id DESC LIMIT 1
    ) last ON true
    WHERE t.{status} = %(failed)s AND t.{step} = ANY(%(row_stages)s::text[])
      AND (%(groups)s::text[] IS NULL OR {group_expr} = ANY(%(groups)s::text[]))
    UNION ALL
    SELECT 'group', g.group_key, g.group_key, g.step, last.error, last.finished_at, last.attempt
    FROM pgstagechain.groups g
    LEFT JOIN LATERAL (
        SELECT r.error, r.finished_at, r.attempt FROM pgstagechain.runs r
        WHERE r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = g.step
        ORDER BY r.id DESC LIMIT 1
    ) last ON true
    WHERE g.pipeline = %(pipeline)s AND g.status = 'failed'
      AND g.step = ANY(%(group_stages)s::text[])
      AND (%(groups)s::text[] IS NULL OR g.group_key = ANY(%(groups)s::text[]))
) failed
ORDER BY finished_at DESC NULLS LAST, level, key
LIMIT %(limit)s

-- name: throughput
-- Runs of each stage that finished in each of the last `minutes` whole minutes (and the
-- current one), succeeded or not; by the block-range index on finished_at (hence the
-- stable statement_timestamp()).
SELECT stage, date_trunc('minute', finished_at) AS minute,
       count(*) FILTER (WHERE state = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE state IN ('failed', 'expired')) AS failed
FROM pgstagechain.runs
WHERE pipeline = %(pipeline)s AND finished_at IS NOT NULL
  AND finished_at >= date_trunc('minute', statement_timestamp()) - %(minutes)s * interval '1 minute'
GROUP BY 1, 2
ORDER BY 2, 1

-- name: live_workers
-- Which workers hold runs of the pipeline now, and since when. The live runs are found
-- through their rows (groups) at (stage, running), as the lease expiry finds them: the
-- cost follows the rows being worked on, not the size of the ledger.
SELECT r.worker_id, count(*) AS running, array_agg(DISTINCT r.stage ORDER BY r.stage) AS stages,
       min(r.started_at) AS oldest_started, max(r.lease_until) AS lease_until
FROM (
    SELECT t.{key}::text AS key, t.{step} AS stage FROM {table} t
    WHERE t.{step} = ANY(%(row_stages)s::text[]) AND t.{status} = %(running)s
    UNION ALL
    SELECT g.group_key, g.step FROM pgstagechain.groups g
    WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_stages)s::text[])
      AND g.status = 'running'
) live
JOIN pgstagechain.runs r
  ON r.pipeline = %(pipeline)s AND r.row_key = live.key AND r.stage = live.stage
WHERE r.state = 'running'
GROUP BY r.worker_id
ORDER BY r.worker_id

-- name: listeners
-- Worker connections listening on this database, by the name they connect with.
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name = %(name)s

-- name: runs_of_groups
SELECT id, stage, row_key, group_key, attempt, state, worker_id, started_at, finished_at,
       retry_at, error, result, superseded_at
FROM pgstagechain.runs
WHERE pipeline = %(pipeline)s AND group_key = ANY(%(groups)s::text[])
ORDER BY id

-- name: runs_of
SELECT id, stage, row_key, group_key, attempt, state, worker_id, started_at, finished_at,
       retry_at, error, result, superseded_at
FROM pgstagechain.runs
WHERE pipeline = %(pipeline)s AND row_key = %(key)s AND stage = ANY(%(stages)s::text[])
ORDER BY id

-- name: row_position
SELECT t.{step} AS step, t.{status} AS status, {group_expr} AS group_key
FROM {table} t WHERE t.{key} = %(key)s::text::{key_type}

-- name: group_position
SELECT step, status FROM pgstagechain.groups WHERE pipeline = %(pipeline)s AND group_key = %(key)s

-- name: retry_rows
-- Move failed rows back to (previous step, done): the trigger announces them, exactly as
-- when the previous stage completed, and a worker claims them anew. One row (`key`), or
-- every row failed at the given stages (`key` NULL).
WITH policy AS (
    SELECT * FROM unnest(%(stages)s::text[], %(afters)s::text[]) AS p(stage, after)
),
moved AS (
    UPDATE {table} t SET {step} = p.after, {status} = %(done)s
    FROM policy p
    WHERE (%(key)s::text IS NULL OR t.{key} = %(key)s::text::{key_type})
      AND t.{step} = p.stage AND t.{status} = %(failed)s
    RETURNING t.{key}::text AS key
)
SELECT key FROM moved ORDER BY key

-- name: retry_groups
WITH policy AS (
    SELECT * FROM unnest(%(stages)s::text[], %(afters)s::text[]) AS p(stage, after)
),
moved AS (
    UPDATE pgstagechain.groups g SET step = p.after, status = 'done',
                                     updated_at = clock_timestamp()
    FROM policy p
    WHERE g.pipeline = %(pipeline)s AND (%(key)s::text IS NULL OR g.group_key = %(key)s)
      AND g.step = p.stage AND g.status = 'failed'
    RETURNING g.group_key AS key
)
SELECT key FROM moved ORDER BY key

-- name: cancel_rows
-- Close the live run (a late completion then finds it gone and is discarded), drop a
-- pending retry (the failed run keeps its state; the reason is appended to its error) and
-- fail the row, all in one statement.
WITH target AS (
    SELECT t.{key}::text AS key, t.{step} AS stage FROM {table} t
    WHERE (%(key)s::text IS NULL OR t.{key} = %(key)s::text::{key_type})
      AND t.{step} = ANY(%(stages)s::text[]) AND t.{status} = %(running)s
),
{cancel_runs},
failed AS (
    UPDATE {table} t SET {status} = %(failed)s FROM target
    WHERE t.{key} = target.key::{key_type} AND t.{step} = target.stage
      AND t.{status} = %(running)s
    RETURNING t.{key}::text AS key
)
{cancel_report}

-- name: cancel_groups
WITH target AS (
    SELECT g.group_key AS key, g.step AS stage FROM pgstagechain.groups g
    WHERE g.pipeline = %(pipeline)s AND (%(key)s::text IS NULL OR g.group_key = %(key)s)
      AND g.step = ANY(%(stages)s::text[]) AND g.status = 'running'
),
{cancel_runs},
failed AS (
    UPDATE pgstagechain.groups g SET status = 'failed', updated_at = clock_timestamp()
    FROM target
    WHERE g.pipeline = %(pipeline)s AND g.group_key = target.key AND g.step = target.stage
      AND g.status = 'running'
    RETURNING g.group_key AS key
)
{cancel_report}

-- fragment: cancel_runs
closed AS (
    UPDATE pgstagechain.runs r SET state = 'cancelled', finished_at = clock_timestamp(),
                                   error = %(reason)s
    FROM target
    WHERE r.pipeline = %(pipeline)s AND r.row_key = target.key AND r.stage = target.stage
      AND r.state = 'running'
    RETURNING r.id
),
dropped AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL,
                                   error = concat_ws(E'\n', r.error, %(reason)s)
    FROM target
    WHERE r.pipeline = %(pipeline)s AND r.row_key = target.key AND r.stage = target.stage
      AND r.retry_at IS NOT NULL
    RETURNING r.id
)

-- fragment: cancel_report
SELECT (SELECT coalesce(array_agg(key ORDER BY key), '{{}}') FROM failed) AS keys,
       (SELECT count(*) FROM closed) AS closed,
       (SELECT count(*) FROM dropped) AS dropped

-- name: group_issues
-- Groups with members that failed for good (at a step of the chain that leads to a group
-- stage), each with its own row if it formed, its member count, and the failed members
-- with the error of their latest run. `groups` (NULL: all) keeps those of the given groups.
WITH hit AS (
    SELECT {group_expr} AS group_key,
           jsonb_object_agg(t.{key}::text,
                            jsonb_build_object('stage', t.{step}, 'error', last.error))
               AS failed_members
    FROM {table} t
    LEFT JOIN LATERAL (
        SELECT r.error FROM pgstagechain.runs r
        WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = t.{step}
        ORDER BY r.id DESC LIMIT 1
    ) last ON true
    WHERE t.{status} = %(failed)s AND t.{step} = ANY(%(member_steps)s::text[])
      AND t.{group} IS NOT NULL
      AND (%(groups)s::text[] IS NULL OR {group_expr} = ANY(%(groups)s::text[]))
    GROUP BY 1
)
SELECT h.group_key, h.failed_members, g.step AS group_step, g.status AS group_status,
       (SELECT count(*) FROM {table} m WHERE m.{group} = h.group_key::{group_type}) AS members,
       last.error AS group_error
FROM hit h
-- each group by its key: a lookup per group (LIMIT keeps the planner from turning it into
-- a join, which read every group of the pipeline)
LEFT JOIN LATERAL (
    SELECT g.step, g.status FROM pgstagechain.groups g
    WHERE g.group_key = h.group_key AND g.pipeline = %(pipeline)s
    LIMIT 1
) g ON true
LEFT JOIN LATERAL (
    SELECT r.error FROM pgstagechain.runs r
    WHERE r.pipeline = %(pipeline)s AND r.row_key = h.group_key AND r.stage = g.step
      AND g.status = 'failed'
    ORDER BY r.id DESC LIMIT 1
) last ON true
ORDER BY h.group_key
