-- Leases: a worker renews the leases of every run it holds in one statement; runs whose
-- lease ran out are closed and re-driven (a retry now if attempts remain, else the row
-- fails). Runs a worker hands back are named by id and token, like a completion.

-- name: renew_leases
UPDATE pgstagechain.runs r SET lease_until = clock_timestamp() + %(lease)s * interval '1 second'
WHERE r.id = ANY(%(run_ids)s::bigint[]) AND r.token = ANY(%(tokens)s::bigint[])
  AND r.state = 'running'
RETURNING r.token

-- name: expire_leases
-- `max_attempts` comes raised for dead workers by the caller: a worker's death is not the
-- handler's fault. `free` retries even when attempts are used up (runs handed back were
-- abandoned, not tried).
WITH policy AS (
    SELECT * FROM unnest(%(stages)s::text[], %(afters)s::text[], %(max_attempts)s::int[],
                         %(is_group)s::bool[]) AS p(stage, after, max_attempts, is_group)
),
expired AS (
    UPDATE pgstagechain.runs r SET state = 'expired', finished_at = clock_timestamp(),
        error = coalesce(%(reason)s, 'lease expired: worker ' || r.worker_id
                         || ' stopped renewing it (crashed, frozen or cut off)'),
        retry_at = CASE WHEN r.attempt < p.max_attempts OR %(free)s THEN clock_timestamp() END
    FROM policy p
    WHERE r.id = ANY(ARRAY({expired_runs}) || ARRAY(
            SELECT x.id FROM pgstagechain.runs x
            WHERE x.id = ANY(%(run_ids)s::bigint[]) AND x.token = ANY(%(tokens)s::bigint[])))
      AND r.pipeline = %(pipeline)s AND r.stage = p.stage AND r.state = 'running'
    RETURNING r.row_key, r.stage, r.retry_at, p.is_group, r.token, r.slot
),
-- the slots the closed runs held (stages with a `max_running`), freed and announced
{release_expired_slots},
-- Rows (groups) at (stage, running) that no run holds: the claim is undone and the row
-- goes back to (previous step, done), whose notification brings a worker. An update, so
-- that two scanners at once repair a row once (the second finds it moved when the first
-- commits).
unheld_rows AS (
    UPDATE {table} t SET {step} = p.after, {status} = %(done)s FROM policy p
    WHERE t.{step} = p.stage AND NOT p.is_group AND t.{status} = %(running)s
      AND NOT EXISTS (
          SELECT 1 FROM pgstagechain.runs r
          WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = p.stage
            AND {run_holds_row})
    RETURNING t.{key}::text AS row_key, p.stage, p.after, {group_expr} AS group_key
),
unheld_groups AS (
    UPDATE pgstagechain.groups g SET step = p.after, status = 'done',
                                     updated_at = clock_timestamp()
    FROM policy p
    WHERE g.pipeline = %(pipeline)s AND g.step = p.stage AND p.is_group AND g.status = 'running'
      AND NOT EXISTS (
          SELECT 1 FROM pgstagechain.runs r
          WHERE r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = p.stage
            AND {run_holds_row})
    RETURNING g.group_key AS row_key, p.stage, p.after, g.group_key
),
-- and the history says what happened
unheld AS (
    INSERT INTO pgstagechain.runs (pipeline, stage, row_key, group_key, attempt, state,
                                   worker_id, lease_until, finished_at, error)
    SELECT %(pipeline)s, u.stage, u.row_key, u.group_key,
           1 + coalesce((SELECT max(r.attempt) FROM pgstagechain.runs r
                         WHERE r.pipeline = %(pipeline)s AND r.row_key = u.row_key
                           AND r.stage = u.stage), 0),
           'expired', 'pgstagechain-recovery', clock_timestamp(), clock_timestamp(),
           'no run held it at (' || u.stage || ', running): its claim was lost'
           || ' (a server crash) or it was set to running by hand; moved back to ('
           || u.after || ', done) to run the stage again'
    FROM (SELECT * FROM unheld_rows UNION ALL SELECT * FROM unheld_groups) u
    RETURNING row_key, stage
),
failed_rows AS (
    UPDATE {table} t SET {status} = %(failed)s FROM expired e
    WHERE e.retry_at IS NULL AND NOT e.is_group
      AND t.{key} = e.row_key::{key_type} AND t.{step} = e.stage AND t.{status} = %(running)s
    RETURNING 1
),
failed_groups AS (
    UPDATE pgstagechain.groups g SET status = 'failed', updated_at = clock_timestamp()
    FROM expired e
    WHERE e.retry_at IS NULL AND e.is_group AND g.pipeline = %(pipeline)s
      AND g.group_key = e.row_key AND g.step = e.stage AND g.status = 'running'
    RETURNING 1
)
-- a retry due now wakes any worker serving the stage
SELECT stage, row_key, retry_at IS NOT NULL AS retrying, FALSE AS unheld,
       CASE WHEN retry_at IS NOT NULL THEN pg_notify(%(channel)s,
           json_build_array('t', stage, row_key, NULL)::text) END
FROM expired
UNION ALL
SELECT stage, row_key, FALSE, TRUE, NULL FROM unheld

-- fragment: expired_runs
-- Live runs whose lease ran out, found through their rows: a row (or group) at
-- (stage, running) leads to its run by the history index, so the cost follows the rows
-- being worked on, not the ledger. `deep` also reads the ledger itself, for runs whose row
-- was moved on by hand while they ran.
SELECT r.id FROM {table} t
JOIN pgstagechain.runs r
  ON r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = t.{step}
WHERE t.{step} = ANY(%(row_stages)s::text[]) AND t.{status} = %(running)s
  AND r.state = 'running' AND r.lease_until < clock_timestamp()
UNION ALL
SELECT r.id FROM pgstagechain.groups g
JOIN pgstagechain.runs r
  ON r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = g.step
WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_stages)s::text[])
  AND g.status = 'running' AND r.state = 'running' AND r.lease_until < clock_timestamp()
UNION ALL
SELECT r.id FROM pgstagechain.runs r
WHERE %(deep)s AND r.pipeline = %(pipeline)s AND r.state = 'running'
  AND r.lease_until < clock_timestamp()

-- fragment: run_holds_row
-- a run holds its row while it is live, or failed with a retry pending
(r.state = 'running' OR r.retry_at IS NOT NULL)
