-- Completion and failure of runs a worker holds. Every run is named by its id *and* its
-- claim's token: run ids come from a sequence, which a server crash can roll back along
-- with the claims it lost; tokens never repeat, so a completion that outlived a crash
-- finds nothing rather than another row's run.

-- name: complete_rows
-- Close the runs still ours (a rescued claim is not) and mark their rows done, which fires
-- the trigger and so the next stage. With `chain`, the rows go straight on to the next
-- stage on this worker instead: from (stage, running) to (next, running) with the next run
-- recorded, in the same statement; they never land on done, so nobody else is woken.
-- Each part is driven by the input arrays or by an array built once from the part before
-- (never a join of two CTEs, which the planner, blind to their sizes, would make
-- quadratic). Rows are found by key: `IS NOT DISTINCT FROM` keeps the state index, whose
-- statistics are always stale during a burst, out of it. The result gives the completed
-- runs' tokens, then the new claims (the result just stored is not visible here: the
-- caller adds it).
WITH {close_runs},
{rows_done_or_on}
{record_chained_runs},
{chained_rows}
{completed_then_chained}

-- name: complete_groups
-- The same for group stages, on the group table; a group may go straight on to the next
-- group stage, with its members.
WITH {close_runs},
{groups_done_or_on}
{record_chained_runs},
{chained_groups}
{completed_then_chained}

-- fragment: close_runs
-- The runs by id (the primary key serves, whatever the statistics say), each proven by its
-- token; the results come as one JSON object keyed by token.
run AS (
    UPDATE pgstagechain.runs r SET state = 'succeeded', finished_at = clock_timestamp(),
                                   result = %(results)s::jsonb -> r.token::text
    WHERE r.id = ANY(%(run_ids)s::bigint[]) AND r.token = ANY(%(tokens)s::bigint[])
      AND r.state = 'running'
    RETURNING r.token, r.row_key, r.slot
)

-- fragment: rows_done_or_on
-- The rows of the runs `run` closed: done, or with `chain` straight on to the next stage.
claimed AS (
    UPDATE {table} t
    SET {step} = CASE WHEN %(chain)s::bool THEN %(next)s ELSE t.{step} END,
        {status} = CASE WHEN %(chain)s::bool THEN %(running)s ELSE %(done)s END
    WHERE t.{key} = ANY(ARRAY(SELECT run.row_key::{key_type} FROM run))
      AND t.{step} IS NOT DISTINCT FROM %(stage)s
      AND t.{status} IS NOT DISTINCT FROM %(running)s
    RETURNING t.{key} AS key, t.{key}::text AS row_key, {group_expr} AS group_key,
              1 AS attempt, t.{status} = %(running)s AS chain,
              CASE WHEN t.{status} = %(running)s
                   THEN nextval('pgstagechain.runs_id_seq') END AS run_id,
              CASE WHEN t.{status} = %(running)s THEN {new_token} END AS token {extras}
),

-- fragment: groups_done_or_on
claimed AS (
    UPDATE pgstagechain.groups g
    SET step = CASE WHEN %(chain)s::bool THEN %(next)s ELSE g.step END,
        status = CASE WHEN %(chain)s::bool THEN 'running' ELSE 'done' END,
        updated_at = clock_timestamp()
    WHERE g.group_key = ANY(ARRAY(SELECT row_key FROM run))
      AND g.pipeline IS NOT DISTINCT FROM %(pipeline)s
      AND g.step IS NOT DISTINCT FROM %(stage)s
      AND g.status IS NOT DISTINCT FROM 'running'
    RETURNING g.group_key AS key, g.group_key AS row_key, g.group_key, 1 AS attempt,
              g.status = 'running' AS chain,
              CASE WHEN g.status = 'running'
                   THEN nextval('pgstagechain.runs_id_seq') END AS run_id,
              CASE WHEN g.status = 'running' THEN {new_token} END AS token
),

-- fragment: chained_rows
chained AS (
    SELECT c.*, earlier.results FROM claimed c {earlier_results} WHERE c.chain
)

-- fragment: chained_groups
chained AS (
    SELECT c.*, earlier.results, mem.members, mem.failed_members
    FROM claimed c {earlier_results} {members} WHERE c.chain
)

-- fragment: record_chained_runs
-- a chained claim starts the next stage's first attempt, and so its own series
runs AS (
    INSERT INTO pgstagechain.runs (id, pipeline, stage, row_key, group_key, attempt, worker_id,
                                   lease_until, token, series)
    OVERRIDING SYSTEM VALUE
    SELECT c.run_id, %(pipeline)s, %(next)s, c.row_key, c.group_key, 1, %(worker)s,
           clock_timestamp() + %(lease)s * interval '1 second', c.token, c.token
    FROM claimed c WHERE c.chain
)

-- fragment: completed_then_chained
-- One result: a row per new claim (completed NULL), then a row per completed run (the
-- claim's columns NULL, by a join that is never true and so never runs).
SELECT NULL::bigint AS completed, n.* FROM chained n
UNION ALL
SELECT run.token, n.* FROM run LEFT JOIN chained n ON FALSE

-- name: fail_row
-- Close the run (and free its slot, if its stage has a `max_running`); when no retry is
-- pending the row fails too.
WITH {close_failed_run},
{release_slots},
moved AS (
    UPDATE {table} t SET {status} = %(failed)s FROM run
    WHERE run.retry_at IS NULL AND t.{key} = run.row_key::{key_type}
      AND t.{step} = %(stage)s AND t.{status} = %(running)s
    RETURNING 1
)
SELECT retry_at FROM run

-- name: fail_group
WITH {close_failed_run},
{release_slots},
moved AS (
    UPDATE pgstagechain.groups g SET status = 'failed', updated_at = clock_timestamp()
    FROM run
    WHERE run.retry_at IS NULL AND g.pipeline = %(pipeline)s
      AND g.group_key = run.row_key AND g.step = %(stage)s AND g.status = 'running'
    RETURNING 1
)
SELECT retry_at FROM run

-- fragment: close_failed_run
run AS (
    UPDATE pgstagechain.runs SET state = %(state)s, finished_at = clock_timestamp(),
                                 error = %(error)s,
                                 retry_at = clock_timestamp() + %(retry_in)s * interval '1 second'
    WHERE id = %(run_id)s AND token = %(token)s AND state = 'running'
    RETURNING row_key, retry_at, token, slot
)
