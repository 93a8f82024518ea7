-- Cluster-wide stage limits (see migrations/0005_stage_limits.sql): the claims of a stage
-- with a limit, its completion, the sweep of slots no live run holds, and writing and
-- reading the declared limits. A stage without limits never runs any of these.
--
-- A limited claim goes in this order: the token bucket, if the stage has a rate (locked:
-- rate-limited claims of a stage take turns); the rows (or groups, or due retries), at
-- most as many as there are whole tokens, locked SKIP LOCKED; the free slots, if the stage
-- has a `max_running`, at most one per row, locked SKIP LOCKED; then as many rows as there
-- are slots are claimed, each run's id and token written into a slot (and the slot's
-- number into the run, so that the statement closing it frees it by its key), and the
-- tokens spent. A
-- slot locked by a claim is always used by it, so a claim that finds none free knows that
-- live runs hold them all, and that their end will announce a free slot.
--
-- The result has one row more than the claims, or one row when nothing was claimed
-- (`run_id` NULL), which says why the claim took fewer than it could: `held_for_slots`,
-- rows were left for lack of a slot; `next_token_in`, seconds until the next token when
-- rows may have been left for lack of tokens.

-- name: claim_rows_by_key_limited
WITH {limit_bucket},
picked AS (
    SELECT t.{key} AS k FROM {table} t
    WHERE t.{key} = ANY(%(keys)s::text[]::{key_array})
      AND t.{step} IS NOT DISTINCT FROM %(after)s AND t.{status} IS NOT DISTINCT FROM %(done)s
    LIMIT {limit_by_tokens}
    FOR UPDATE SKIP LOCKED
),
{limit_slots},
claimed AS (
    UPDATE {table} t SET {step} = %(stage)s, {status} = %(running)s
    WHERE t.{key} = ANY(ARRAY(SELECT k FROM picked LIMIT (SELECT n FROM allowed)))
    RETURNING {claimed_row_columns}
),
{limit_spend}
{limit_result_rows}

-- name: claim_rows_ready_limited
WITH {limit_bucket},
picked AS (
    SELECT t.{key} AS k FROM {table} t
    WHERE t.{step} = %(after)s AND t.{status} = %(done)s
    LIMIT {limit_by_tokens}
    FOR UPDATE SKIP LOCKED
),
{limit_slots},
claimed AS (
    UPDATE {table} t SET {step} = %(stage)s, {status} = %(running)s
    WHERE t.{key} = ANY(ARRAY(SELECT k FROM picked LIMIT (SELECT n FROM allowed)))
    RETURNING {claimed_row_columns}
),
{limit_spend}
{limit_result_rows}

-- name: claim_groups_by_key_limited
WITH {limit_bucket},
picked AS (
    SELECT g.ctid FROM pgstagechain.groups g
    WHERE g.group_key = ANY(%(keys)s::text[]) AND g.pipeline IS NOT DISTINCT FROM %(pipeline)s
      AND g.step IS NOT DISTINCT FROM %(after)s AND g.status IS NOT DISTINCT FROM 'done'
    LIMIT {limit_by_tokens}
    FOR UPDATE SKIP LOCKED
),
{limit_slots},
{claimed_groups_limited},
{limit_spend}
{limit_result_groups}

-- name: claim_groups_ready_limited
WITH {limit_bucket},
picked AS (
    SELECT g.ctid FROM pgstagechain.groups g
    WHERE g.step = %(after)s AND g.status = 'done' AND g.pipeline = %(pipeline)s
    LIMIT {limit_by_tokens}
    FOR UPDATE SKIP LOCKED
),
{limit_slots},
{claimed_groups_limited},
{limit_spend}
{limit_result_groups}

-- name: claim_row_retries_limited
WITH {limit_bucket},
picked AS ({due_retries_limited}),
{limit_slots},
consumed AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL
    WHERE r.id = ANY(ARRAY(SELECT id FROM picked LIMIT (SELECT n FROM allowed)))
    RETURNING r.row_key, r.attempt, r.series
),
{retried_rows}
{limit_spend}
{limit_result_rows}

-- name: claim_group_retries_limited
WITH {limit_bucket},
picked AS ({due_retries_limited}),
{limit_slots},
consumed AS (
    UPDATE pgstagechain.runs r SET retry_at = NULL
    WHERE r.id = ANY(ARRAY(SELECT id FROM picked LIMIT (SELECT n FROM allowed)))
    RETURNING r.row_key, r.attempt, r.series
),
{retried_groups}
{limit_spend}
{limit_result_groups}

-- fragment: claimed_groups_limited
claimed AS (
    UPDATE pgstagechain.groups g SET step = %(stage)s, status = 'running',
                                     updated_at = clock_timestamp()
    WHERE g.ctid = ANY(ARRAY(SELECT ctid FROM picked LIMIT (SELECT n FROM allowed)))
    RETURNING g.group_key AS key, g.group_key AS row_key, g.group_key, 1 AS attempt,
              nextval('pgstagechain.runs_id_seq') AS run_id,
              {new_token} AS token, NULL::bigint AS series
)

-- fragment: due_retries_limited
SELECT r.id FROM pgstagechain.runs r
WHERE r.retry_at <= clock_timestamp() AND r.pipeline = %(pipeline)s AND r.stage = %(stage)s
ORDER BY r.retry_at
LIMIT {limit_by_tokens}
FOR UPDATE SKIP LOCKED

-- fragment: limit_bucket
-- The stage's token bucket, refilled up to its burst for the time since it was last
-- refilled; locked (and waited for) only when the stage has a rate.
bucket AS (
    SELECT l.max_per_second,
           least(l.burst, l.tokens + l.max_per_second
                 * extract(epoch FROM clock_timestamp() - l.refilled_at)) AS tokens,
           clock_timestamp() AS now
    FROM pgstagechain.stage_limits l
    WHERE l.pipeline = %(pipeline)s AND l.stage = %(stage)s AND l.max_per_second IS NOT NULL
    FOR UPDATE
)

-- fragment: limit_by_tokens
least(%(limit)s, coalesce((SELECT floor(b.tokens)::int FROM bucket b), %(limit)s))

-- fragment: limit_slots
-- At most one free slot per row picked; with no `max_running`, every row picked.
capped AS (
    SELECT l.max_running IS NOT NULL AS slotted FROM pgstagechain.stage_limits l
    WHERE l.pipeline = %(pipeline)s AND l.stage = %(stage)s
),
free_slots AS (
    SELECT s.slot FROM pgstagechain.stage_slots s
    WHERE s.pipeline = %(pipeline)s AND s.stage = %(stage)s AND s.token IS NULL
      AND coalesce((SELECT slotted FROM capped), FALSE)
    LIMIT (SELECT count(*) FROM picked)
    FOR UPDATE SKIP LOCKED
),
allowed AS (
    SELECT CASE WHEN coalesce((SELECT slotted FROM capped), FALSE)
                THEN (SELECT count(*) FROM free_slots)
                ELSE (SELECT count(*) FROM picked) END AS n
)

-- fragment: limit_spend
-- Every claim records its runs, each with the slot it takes, and spends a token for each.
paired AS (
    SELECT c.run_id, c.token, f.slot
    FROM (SELECT c.run_id, c.token, row_number() OVER () AS n FROM claimed c) c
    JOIN (SELECT f.slot, row_number() OVER () AS n FROM free_slots f) f ON f.n = c.n
),
runs AS (
    INSERT INTO pgstagechain.runs (id, pipeline, stage, row_key, group_key, attempt, worker_id,
                                   lease_until, token, series, slot)
    OVERRIDING SYSTEM VALUE
    SELECT c.run_id, %(pipeline)s, %(stage)s, c.row_key, c.group_key, c.attempt, %(worker)s,
           clock_timestamp() + %(lease)s * interval '1 second', c.token,
           coalesce(c.series, c.token), p.slot
    FROM claimed c LEFT JOIN paired p ON p.run_id = c.run_id
),
taken AS (
    UPDATE pgstagechain.stage_slots s
    SET run_id = p.run_id, token = p.token, taken_at = clock_timestamp()
    FROM paired p
    WHERE s.pipeline = %(pipeline)s AND s.stage = %(stage)s AND s.slot = p.slot
),
spent AS (
    UPDATE pgstagechain.stage_limits l
    SET tokens = b.tokens - (SELECT count(*) FROM claimed), refilled_at = b.now
    FROM bucket b
    WHERE l.pipeline = %(pipeline)s AND l.stage = %(stage)s
)

-- fragment: limit_held
-- why the claim took fewer than it could (see the top of this file)
(SELECT count(*) FROM picked) > (SELECT n FROM allowed) AS held_for_slots,
(SELECT CASE WHEN floor(b.tokens) < %(limit)s
                  AND (SELECT count(*) FROM picked) >= floor(b.tokens)
             THEN greatest(0, 1 - (b.tokens - (SELECT count(*) FROM claimed)))
                  / b.max_per_second END
 FROM bucket b) AS next_token_in

-- fragment: limit_result_rows
SELECT {limit_held}, c.*, earlier.results
FROM (SELECT 1) one LEFT JOIN claimed c ON TRUE {earlier_results}

-- fragment: limit_result_groups
SELECT {limit_held}, c.*, earlier.results, mem.members, mem.failed_members
FROM (SELECT 1) one LEFT JOIN claimed c ON TRUE {earlier_results} {members}

-- name: complete_rows_limited
-- complete_rows, freeing the slots of the runs it closes (and announcing them)
WITH {close_runs},
{release_slots},
{rows_done_or_on}
{record_chained_runs},
{chained_rows}
{completed_then_chained}

-- name: complete_groups_limited
WITH {close_runs},
{release_slots},
{groups_done_or_on}
{record_chained_runs},
{chained_groups}
{completed_then_chained}

-- fragment: release_slots
-- The slots of the runs `run` closed, found by their key and still holding the run's
-- token, freed; each freed slot is announced (one notification per stage and transaction:
-- PostgreSQL folds equal payloads) so that a worker holding back for lack of a slot claims
-- again at once.
released AS (
    UPDATE pgstagechain.stage_slots s SET run_id = NULL, token = NULL, taken_at = NULL
    WHERE s.pipeline = %(pipeline)s AND s.stage = %(stage)s
      AND s.slot = ANY(ARRAY(SELECT run.slot FROM run WHERE run.slot IS NOT NULL))
      AND s.token = ANY(ARRAY(SELECT run.token FROM run))
    RETURNING {announce_slot}
)

-- fragment: announce_slot
pg_notify(%(channel)s, json_build_array('s', s.stage, 'slot', NULL)::text)

-- name: free_stale_slots
-- A slot whose run is closed (cancelled by an operator, the group re-formed), or is gone
-- from the ledger and was taken over a minute ago, is freed: by the recovery scan, and by
-- a cancel or a re-run in the transaction that closes runs.
-- A slot taken since this statement's snapshot names a run the snapshot cannot see, so
-- it is never freed by the first test, and the minute keeps it from the second.
UPDATE pgstagechain.stage_slots s SET run_id = NULL, token = NULL, taken_at = NULL
WHERE s.pipeline = %(pipeline)s AND s.token IS NOT NULL
  AND (EXISTS (SELECT 1 FROM pgstagechain.runs r
               WHERE r.id = s.run_id AND r.token = s.token AND r.state <> 'running')
       OR (s.taken_at < clock_timestamp() - interval '1 minute'
           AND NOT EXISTS (SELECT 1 FROM pgstagechain.runs r
                           WHERE r.id = s.run_id AND r.token = s.token)))
RETURNING s.stage, {announce_slot}

-- name: write_limits
-- The declared limits of a pipeline's stages, one array element per limited stage: rows
-- of stages no longer limited go, changed rows are updated (a bucket keeps its tokens, up
-- to its new burst; a new bucket starts full), unchanged ones are not written.
WITH declared AS (
    SELECT * FROM unnest(%(stages)s::text[], %(max_running)s::int[],
                         %(max_per_second)s::float8[], %(burst)s::float8[])
        AS d(stage, max_running, max_per_second, burst)
),
dropped AS (
    DELETE FROM pgstagechain.stage_limits l
    WHERE l.pipeline = %(pipeline)s AND l.stage <> ALL(%(stages)s::text[])
),
written AS (
    INSERT INTO pgstagechain.stage_limits AS l
        (pipeline, stage, max_running, max_per_second, burst, tokens, refilled_at)
    SELECT %(pipeline)s, d.stage, d.max_running, d.max_per_second, d.burst, d.burst,
           clock_timestamp()
    FROM declared d
    ON CONFLICT (pipeline, stage) DO UPDATE
    SET max_running = excluded.max_running, max_per_second = excluded.max_per_second,
        burst = excluded.burst, tokens = least(coalesce(l.tokens, excluded.burst), excluded.burst),
        refilled_at = coalesce(l.refilled_at, excluded.refilled_at),
        updated_at = clock_timestamp()
    WHERE (l.max_running, l.max_per_second, l.burst)
          IS DISTINCT FROM (excluded.max_running, excluded.max_per_second, excluded.burst)
),
slots_dropped AS (
    DELETE FROM pgstagechain.stage_slots s
    WHERE s.pipeline = %(pipeline)s
      AND NOT EXISTS (SELECT 1 FROM declared d
                      WHERE d.stage = s.stage AND s.slot <= coalesce(d.max_running, 0))
)
INSERT INTO pgstagechain.stage_slots (pipeline, stage, slot)
SELECT %(pipeline)s, d.stage, n
FROM declared d, generate_series(1, coalesce(d.max_running, 0)) AS n
ON CONFLICT DO NOTHING

-- name: read_limits
SELECT l.stage, l.max_running, l.max_per_second, l.burst
FROM pgstagechain.stage_limits l WHERE l.pipeline = %(pipeline)s
ORDER BY l.stage

-- name: limits_status
-- Each limited stage: its limits, the live runs holding its slots, and the tokens in its
-- bucket now (refilled for the time since, not written).
SELECT l.stage, l.max_running, l.max_per_second, l.burst,
       (SELECT count(*) FROM pgstagechain.stage_slots s
        WHERE s.pipeline = l.pipeline AND s.stage = l.stage AND s.token IS NOT NULL) AS taken,
       least(l.burst, l.tokens + l.max_per_second
             * extract(epoch FROM clock_timestamp() - l.refilled_at)) AS tokens
FROM pgstagechain.stage_limits l WHERE l.pipeline = %(pipeline)s

-- name: forget_limits
WITH slots AS (DELETE FROM pgstagechain.stage_slots WHERE pipeline = %(pipeline)s)
DELETE FROM pgstagechain.stage_limits WHERE pipeline = %(pipeline)s

-- fragment: release_expired_slots
released AS (
    UPDATE pgstagechain.stage_slots s SET run_id = NULL, token = NULL, taken_at = NULL
    FROM expired e
    WHERE s.pipeline = %(pipeline)s AND s.stage = e.stage AND s.slot = e.slot
      AND s.token = e.token
    RETURNING {announce_slot}
)

-- name: complete_rows_into_limited
-- complete_rows with the rows going straight on to a next stage that has limits: as many
-- as it has free slots (locked SKIP LOCKED) and whole tokens go on, each run's token
-- written into a slot and a token spent for each, in this statement; the others land on
-- done, where the trigger announces them to whoever claims them. The slots of the runs
-- closed here are freed as in complete_rows_limited.
WITH {close_runs},
{release_slots},
next_bucket AS (
    SELECT l.max_per_second,
           least(l.burst, l.tokens + l.max_per_second
                 * extract(epoch FROM clock_timestamp() - l.refilled_at)) AS tokens,
           clock_timestamp() AS now
    FROM pgstagechain.stage_limits l
    WHERE l.pipeline = %(pipeline)s AND l.stage = %(next)s AND l.max_per_second IS NOT NULL
    FOR UPDATE
),
next_capped AS (
    SELECT l.max_running IS NOT NULL AS slotted FROM pgstagechain.stage_limits l
    WHERE l.pipeline = %(pipeline)s AND l.stage = %(next)s
),
next_wanted AS (
    SELECT least((SELECT count(*) FROM run),
                 coalesce((SELECT floor(b.tokens)::int FROM next_bucket b),
                          (SELECT count(*) FROM run))) AS n
),
next_free AS (
    SELECT s.slot FROM pgstagechain.stage_slots s
    WHERE s.pipeline = %(pipeline)s AND s.stage = %(next)s AND s.token IS NULL
      AND coalesce((SELECT slotted FROM next_capped), FALSE)
    LIMIT (SELECT n FROM next_wanted)
    FOR UPDATE SKIP LOCKED
),
onward AS (
    SELECT run.row_key FROM run
    LIMIT CASE WHEN coalesce((SELECT slotted FROM next_capped), FALSE)
               THEN (SELECT count(*) FROM next_free) ELSE (SELECT n FROM next_wanted) END
),
claimed AS (
    UPDATE {table} t
    SET {step} = CASE WHEN t.{key}::text = ANY(ARRAY(SELECT row_key FROM onward))
                      THEN %(next)s ELSE t.{step} END,
        {status} = CASE WHEN t.{key}::text = ANY(ARRAY(SELECT row_key FROM onward))
                        THEN %(running)s ELSE %(done)s END
    WHERE t.{key} = ANY(ARRAY(SELECT run.row_key::{key_type} FROM run))
      AND t.{step} IS NOT DISTINCT FROM %(stage)s
      AND t.{status} IS NOT DISTINCT FROM %(running)s
    RETURNING t.{key} AS key, t.{key}::text AS row_key, {group_expr} AS group_key,
              1 AS attempt, t.{status} = %(running)s AS chain,
              CASE WHEN t.{status} = %(running)s
                   THEN nextval('pgstagechain.runs_id_seq') END AS run_id,
              CASE WHEN t.{status} = %(running)s THEN {new_token} END AS token {extras}
),
next_paired AS (
    SELECT c.run_id, c.token, f.slot
    FROM (SELECT c.run_id, c.token, row_number() OVER () AS n FROM claimed c WHERE c.chain) c
    JOIN (SELECT f.slot, row_number() OVER () AS n FROM next_free f) f ON f.n = c.n
),
runs AS (
    INSERT INTO pgstagechain.runs (id, pipeline, stage, row_key, group_key, attempt, worker_id,
                                   lease_until, token, series, slot)
    OVERRIDING SYSTEM VALUE
    SELECT c.run_id, %(pipeline)s, %(next)s, c.row_key, c.group_key, 1, %(worker)s,
           clock_timestamp() + %(lease)s * interval '1 second', c.token, c.token, p.slot
    FROM claimed c LEFT JOIN next_paired p ON p.run_id = c.run_id WHERE c.chain
),
next_taken AS (
    UPDATE pgstagechain.stage_slots s
    SET run_id = p.run_id, token = p.token, taken_at = clock_timestamp()
    FROM next_paired p
    WHERE s.pipeline = %(pipeline)s AND s.stage = %(next)s AND s.slot = p.slot
),
next_spent AS (
    UPDATE pgstagechain.stage_limits l
    SET tokens = b.tokens - (SELECT count(*) FROM claimed c WHERE c.chain), refilled_at = b.now
    FROM next_bucket b
    WHERE l.pipeline = %(pipeline)s AND l.stage = %(next)s
),
{chained_rows}
{completed_then_chained}
