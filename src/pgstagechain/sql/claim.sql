-- Verify-then-claim: each claim is one statement that locks the rows (or groups) still
-- ready, skipping those another claimer holds, moves them to (stage, running) and records
-- their runs, then returns what the handlers' contexts need.
--
-- Placeholders in braces are the pipeline's configured names, quoted by psycopg.sql
-- (see _sql.py), or fragments of this folder; %(name)s are the statement's parameters.

-- name: claim_rows_by_key
-- The rows of the given keys, found by key: the state test is kept out of the index
-- choice (`IS NOT DISTINCT FROM`), whose statistics are always stale during a burst.
WITH picked AS (
    SELECT t.{key} AS k FROM {table} t
    WHERE t.{key} = ANY(%(keys)s::text[]::{key_array})
      AND t.{step} IS NOT DISTINCT FROM %(after)s AND t.{status} IS NOT DISTINCT FROM %(done)s
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
{claim_picked_rows}

-- name: claim_rows_ready
-- Any ready rows, through the state index.
WITH picked AS (
    SELECT t.{key} AS k FROM {table} t
    WHERE t.{step} = %(after)s AND t.{status} = %(done)s
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
{claim_picked_rows}

-- fragment: claim_picked_rows
-- The run ids and tokens are drawn here, so the result needs no join back to the ledger;
-- a first attempt starts its own series. The token, drawn at random, proves the claim in
-- every later statement.
claimed AS (
    UPDATE {table} t SET {step} = %(stage)s, {status} = %(running)s
    WHERE t.{key} = ANY(ARRAY(SELECT k FROM picked))
    RETURNING {claimed_row_columns}
),
{record_runs}
SELECT c.*, earlier.results FROM claimed c {earlier_results}

-- name: claim_groups_by_key
WITH picked AS (
    SELECT g.ctid FROM pgstagechain.groups g
    WHERE g.group_key = ANY(%(keys)s::text[]) AND g.pipeline IS NOT DISTINCT FROM %(pipeline)s
      AND g.step IS NOT DISTINCT FROM %(after)s AND g.status IS NOT DISTINCT FROM 'done'
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
{claim_picked_groups}

-- name: claim_groups_ready
WITH picked AS (
    SELECT g.ctid FROM pgstagechain.groups g
    WHERE g.step = %(after)s AND g.status = 'done' AND g.pipeline = %(pipeline)s
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
{claim_picked_groups}

-- fragment: claim_picked_groups
-- A group is found again by its row version: it is locked, so it cannot move. Its claim
-- carries its members, so the handler needs no other round trip.
claimed AS (
    UPDATE pgstagechain.groups g SET step = %(stage)s, status = 'running',
                                     updated_at = clock_timestamp()
    WHERE g.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING g.group_key AS key, g.group_key AS row_key, g.group_key, 1 AS attempt,
              nextval('pgstagechain.runs_id_seq') AS run_id,
              {new_token} AS token, NULL::bigint AS series
),
{record_runs}
SELECT c.*, earlier.results, mem.members, mem.failed_members
FROM claimed c {earlier_results} {members}

-- name: claim_row_retries
-- Retries whose time has come: consume the pending retry of the failed run and open the
-- next attempt of the same series, provided the row is still at (stage, running).
WITH due AS ({due_retries}),
consumed AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL FROM due WHERE r.id = due.id
    RETURNING r.row_key, r.attempt, r.series
),
{retried_rows}
{record_runs}
SELECT c.*, earlier.results FROM claimed c {earlier_results}

-- name: claim_group_retries
WITH due AS ({due_retries}),
consumed AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL FROM due WHERE r.id = due.id
    RETURNING r.row_key, r.attempt, r.series
),
{retried_groups}
{record_runs}
SELECT c.*, earlier.results, mem.members, mem.failed_members
FROM claimed c {earlier_results} {members}

-- fragment: retried_rows
-- the next attempt of each consumed retry, provided its row is still at (stage, running)
claimed AS (
    SELECT t.{key} AS key, c.row_key, {group_expr} AS group_key,
           c.attempt + 1 AS attempt, nextval('pgstagechain.runs_id_seq') AS run_id,
           {new_token} AS token, c.series {extras}
    FROM consumed c JOIN {table} t ON t.{key} = c.row_key::{key_type}
    WHERE t.{step} = %(stage)s AND t.{status} = %(running)s
),

-- fragment: retried_groups
claimed AS (
    SELECT g.group_key AS key, c.row_key, g.group_key, c.attempt + 1 AS attempt,
           nextval('pgstagechain.runs_id_seq') AS run_id, {new_token} AS token, c.series
    FROM consumed c JOIN pgstagechain.groups g
      ON g.pipeline = %(pipeline)s AND g.group_key = c.row_key
    WHERE g.step = %(stage)s AND g.status = 'running'
),

-- fragment: claimed_row_columns
t.{key} AS key, t.{key}::text AS row_key, {group_expr} AS group_key,
1 AS attempt, nextval('pgstagechain.runs_id_seq') AS run_id,
{new_token} AS token, NULL::bigint AS series {extras}

-- fragment: due_retries
SELECT r.id FROM pgstagechain.runs r
WHERE r.retry_at <= clock_timestamp() AND r.pipeline = %(pipeline)s AND r.stage = %(stage)s
ORDER BY r.retry_at
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED

-- fragment: record_runs
-- Every claim records its runs in the ledger in the same statement.
runs AS (
    INSERT INTO pgstagechain.runs (id, pipeline, stage, row_key, group_key, attempt, worker_id,
                                   lease_until, token, series)
    OVERRIDING SYSTEM VALUE
    SELECT c.run_id, %(pipeline)s, %(stage)s, c.row_key, c.group_key, c.attempt, %(worker)s,
           clock_timestamp() + %(lease)s * interval '1 second', c.token, coalesce(c.series, c.token)
    FROM claimed c
)

-- fragment: earlier_results
-- The results of the earlier stages of the claimed row `c`, looked up per key through the
-- history index (not even looked up for a first stage); a re-run superseded those of the
-- runs it runs again.
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(r.stage, r.result ORDER BY r.id) AS results
    FROM pgstagechain.runs r
    WHERE cardinality(%(ancestors)s::text[]) > 0
      AND r.pipeline = %(pipeline)s AND r.row_key = c.row_key
      AND r.stage = ANY(%(ancestors)s::text[]) AND r.state = 'succeeded'
      AND r.result IS NOT NULL AND r.superseded_at IS NULL
) earlier ON c.run_id IS NOT NULL

-- fragment: members
-- The members of the claimed group `c`, each with the results of its row stages; the group
-- column is compared in its own type so that its index serves. Members that failed for good
-- (a group formed under FanIn.SETTLED) come apart, with their stage and latest error.
LEFT JOIN LATERAL (
    SELECT jsonb_object_agg(m.row_key, coalesce(mr.results, '{{}}'::jsonb))
               FILTER (WHERE NOT m.failed) AS members,
           jsonb_object_agg(m.row_key, jsonb_build_object('stage', m.step, 'error', mf.error))
               FILTER (WHERE m.failed) AS failed_members
    FROM (SELECT t.{key}::text AS row_key, t.{step} AS step,
                 t.{status} IS NOT DISTINCT FROM %(failed)s AS failed
          FROM {table} t
          WHERE t.{group} = c.group_key::{group_type}) m
    LEFT JOIN LATERAL (
        SELECT jsonb_object_agg(r.stage, r.result ORDER BY r.id) AS results
        FROM pgstagechain.runs r
        WHERE r.pipeline = %(pipeline)s AND r.row_key = m.row_key
          AND r.stage = ANY(%(row_stages)s::text[]) AND r.state = 'succeeded'
          AND r.result IS NOT NULL AND r.superseded_at IS NULL
    ) mr ON NOT m.failed
    LEFT JOIN LATERAL (
        SELECT r.error FROM pgstagechain.runs r
        WHERE r.pipeline = %(pipeline)s AND r.row_key = m.row_key AND r.stage = m.step
        ORDER BY r.id DESC LIMIT 1
    ) mf ON m.failed
) mem ON c.run_id IS NOT NULL

-- fragment: new_token
-- A claim's token: 62 random bits from the backend's generator, which PostgreSQL seeds from
-- a strong random source when the backend starts (so anew after a crash). It only has to
-- tell apart two claims that were handed the same run id, one of them lost in a crash: a
-- chance of 2^-53 that it cannot. Drawn by the claim statement itself, not from a
-- sequence or anything else a transaction lost in a crash could hand out again.
(random() * 4611686018427387904)::bigint
