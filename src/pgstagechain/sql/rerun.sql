-- Re-runs: putting rows (or groups) that reached a stage back to (the step before it, done),
-- so that it and every stage after it run again. A re-run works one batch of keys at a
-- time, one transaction per batch: it locks what it changes with SKIP LOCKED (rows, then
-- the fan-in locks of their groups and the group rows, then the runs), so it never waits
-- for a worker; whatever a worker holds at that moment is tried again in a later batch.

-- name: rerun_select_rows
-- One page of the rows a re-run names, in key order after `after_key`: with `keys`, those
-- rows (each with `matched`: whether it passes the other filters); without, the rows that
-- pass them. `since`/`until` look for a run of the stage that started in that window.
-- (`limit` NULL with `keys`: no limit.)
SELECT s.key, s.matched FROM (
    SELECT t.{key} AS k, t.{key}::text AS key,
           ((%(groups)s::text[] IS NULL OR {group_expr} = ANY(%(groups)s::text[]))
            AND (%(status)s::text IS NULL OR t.{status} = %(status)s)
            AND ((%(since)s::timestamptz IS NULL AND %(until)s::timestamptz IS NULL)
                 OR EXISTS (
                    SELECT 1 FROM pgstagechain.runs r
                    WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text
                      AND r.stage = %(stage)s
                      AND (%(since)s::timestamptz IS NULL OR r.started_at >= %(since)s)
                      AND (%(until)s::timestamptz IS NULL OR r.started_at < %(until)s)))
           ) AS matched
    FROM {table} t
    WHERE (%(keys)s::text[] IS NULL OR t.{key} = ANY(%(keys)s::text[]::{key_array}))
      AND (%(after_key)s::text IS NULL OR t.{key} > %(after_key)s::text::{key_type})
) s
WHERE s.matched OR %(keys)s::text[] IS NOT NULL
ORDER BY s.k
LIMIT %(limit)s

-- name: rerun_missing_rows
-- The given keys no row has.
SELECT k.given FROM unnest(%(keys)s::text[]) AS k(given)
WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE t.{key} = k.given::{key_type})

-- name: rerun_select_groups
-- The same for groups (a group stage): `keys` and `groups` both name group keys.
SELECT s.key, s.matched FROM (
    SELECT g.group_key AS key,
           ((%(groups)s::text[] IS NULL OR g.group_key = ANY(%(groups)s::text[]))
            AND (%(status)s::text IS NULL OR g.status = %(status)s)
            AND ((%(since)s::timestamptz IS NULL AND %(until)s::timestamptz IS NULL)
                 OR EXISTS (
                    SELECT 1 FROM pgstagechain.runs r
                    WHERE r.pipeline = %(pipeline)s AND r.row_key = g.group_key
                      AND r.stage = %(stage)s
                      AND (%(since)s::timestamptz IS NULL OR r.started_at >= %(since)s)
                      AND (%(until)s::timestamptz IS NULL OR r.started_at < %(until)s)))
           ) AS matched
    FROM pgstagechain.groups g
    WHERE g.pipeline = %(pipeline)s
      AND (%(keys)s::text[] IS NULL OR g.group_key = ANY(%(keys)s::text[]))
      AND (%(after_key)s::text IS NULL OR g.group_key > %(after_key)s)
) s
WHERE s.matched OR %(keys)s::text[] IS NOT NULL
ORDER BY s.key
LIMIT %(limit)s

-- name: rerun_missing_groups
SELECT k.given FROM unnest(%(keys)s::text[]) AS k(given)
WHERE NOT EXISTS (SELECT 1 FROM pgstagechain.groups g
                  WHERE g.pipeline = %(pipeline)s AND g.group_key = k.given)

-- name: rerun_rows
-- Where the given rows are, and whether this transaction now holds each (`locked`; with
-- `lock` false nothing is locked: a dry run). A row a worker holds is not waited for.
WITH found AS (
    SELECT t.{key} AS k, t.{key}::text AS key, t.{step} AS step, t.{status} AS status,
           {group_expr} AS group_key
    FROM {table} t WHERE t.{key} = ANY(%(keys)s::text[]::{key_array})
),
locked AS (
    SELECT t.{key}::text AS key, t.{step} AS step, t.{status} AS status
    FROM {table} t
    WHERE %(lock)s::bool AND t.{key} = ANY(%(keys)s::text[]::{key_array})
    FOR UPDATE SKIP LOCKED
)
SELECT f.key, coalesce(l.step, f.step) AS step, coalesce(l.status, f.status) AS status,
       f.group_key, l.key IS NOT NULL AS locked
FROM found f LEFT JOIN locked l ON l.key = f.key
ORDER BY f.k

-- name: rerun_groups
-- Where the given groups are, and whether this transaction now holds each: with `fan_in`,
-- only after taking the group's fan-in lock (the one the trigger takes to form it), so no
-- member can form it while the re-run moves its members.
WITH found AS (
    SELECT g.group_key AS key, g.step, g.status FROM pgstagechain.groups g
    WHERE g.pipeline = %(pipeline)s AND g.group_key = ANY(%(groups)s::text[])
),
fan_in AS (
    SELECT k.key FROM unnest(%(groups)s::text[]) AS k(key)
    -- (CASE: a dry run never takes a lock)
    WHERE CASE WHEN NOT %(lock)s::bool THEN false
               WHEN NOT %(fan_in)s::bool THEN true
               ELSE pg_try_advisory_xact_lock(hashtextextended(%(pipeline)s || ':' || k.key, 0))
          END
),
locked AS (
    SELECT g.group_key AS key, g.step, g.status FROM pgstagechain.groups g
    WHERE g.pipeline = %(pipeline)s AND g.group_key = ANY(ARRAY(SELECT key FROM fan_in))
    FOR UPDATE SKIP LOCKED
)
SELECT k.key, coalesce(l.step, f.step) AS step, coalesce(l.status, f.status) AS status,
       f.key IS NOT NULL AS formed,
       k.key IN (SELECT key FROM fan_in)
           AND (f.key IS NULL OR l.key IS NOT NULL) AS locked
FROM unnest(%(groups)s::text[]) AS k(key)
LEFT JOIN found f ON f.key = k.key
LEFT JOIN locked l ON l.key = k.key
ORDER BY k.key

-- name: rerun_runs
-- The live runs and pending retries of the given rows (or groups) at the given stages, and
-- whether this transaction now holds each: one a worker holds (completing, failing, taking
-- up its retry) is not waited for, nor one that changed since this statement began.
WITH open AS (
    SELECT r.id, r.row_key, r.state = 'running' AS live FROM pgstagechain.runs r
    WHERE r.pipeline = %(pipeline)s AND r.row_key = ANY(%(keys)s::text[])
      AND r.stage = ANY(%(stages)s::text[])
      AND (r.state = 'running' OR r.retry_at IS NOT NULL)
),
locked AS (
    SELECT r.id FROM pgstagechain.runs r
    WHERE %(lock)s::bool AND r.id = ANY(ARRAY(SELECT id FROM open))
      AND (r.state = 'running' OR r.retry_at IS NOT NULL)
    FOR UPDATE SKIP LOCKED
)
SELECT o.id, o.row_key, o.live, l.id IS NOT NULL AS locked
FROM open o LEFT JOIN locked l ON l.id = o.id

-- name: rerun_close_runs
-- Cancel the given runs as `cancel` does: a live run is closed (its worker's completion then
-- finds it gone and is rolled back with its writes), a pending retry is dropped.
WITH closed AS (
    UPDATE pgstagechain.runs r SET state = 'cancelled', finished_at = clock_timestamp(),
                                   error = %(reason)s
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.state = 'running'
    RETURNING r.id
),
dropped AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL,
                                   error = concat_ws(E'\n', r.error, %(reason)s)
    WHERE r.id = ANY(%(ids)s::bigint[]) AND r.retry_at IS NOT NULL AND r.state <> 'running'
    RETURNING r.id
)
SELECT (SELECT count(*) FROM closed) AS closed, (SELECT count(*) FROM dropped) AS dropped

-- name: rerun_supersede_results
-- The results of the runs about to run again leave `ctx.results` (they stay in the
-- history): a stage that now returns nothing must not hand on what it returned before.
UPDATE pgstagechain.runs r SET superseded_at = clock_timestamp()
WHERE r.pipeline = %(pipeline)s AND r.row_key = ANY(%(keys)s::text[])
  AND r.stage = ANY(%(stages)s::text[]) AND r.result IS NOT NULL
  AND r.superseded_at IS NULL

-- name: rerun_move_rows
-- The rows back to (the step before the stage, done): the trigger announces them.
UPDATE {table} t SET {step} = %(after)s, {status} = %(done)s
WHERE t.{key} = ANY(%(keys)s::text[]::{key_array})

-- name: rerun_move_groups
UPDATE pgstagechain.groups g SET step = %(after)s, status = 'done',
                                 updated_at = clock_timestamp()
WHERE g.pipeline = %(pipeline)s AND g.group_key = ANY(%(groups)s::text[])

-- name: rerun_unform_groups
-- Groups whose members go back: the group row goes, so that nothing runs on the old members
-- meanwhile; the trigger forms it again, once, when its last member is back at the fan-in
-- step. Its runs stay in the history.
DELETE FROM pgstagechain.groups g
WHERE g.pipeline = %(pipeline)s AND g.group_key = ANY(%(groups)s::text[])

-- name: rerun_invalid_key
-- The first of the given keys that the key column's type cannot hold (PostgreSQL 16).
SELECT k FROM unnest(%(keys)s::text[]) AS k WHERE NOT pg_input_is_valid(k, %(type)s) LIMIT 1
