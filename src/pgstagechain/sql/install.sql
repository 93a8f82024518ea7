-- Installing a pipeline on the user's table: its trigger and the indexes its scans need.
-- Everything install creates is recorded in pgstagechain.pipelines.created, so that
-- uninstall removes exactly that and nothing of the user's.

-- name: trigger_function
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $pgstagechain$
BEGIN
    IF {landed_on_done} THEN
        {announce_row}
    END IF;
    RETURN NULL;
END
$pgstagechain$

-- name: trigger_function_fan_in
-- Variables are prefixed so that they never shadow a column of the user's table.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $pgstagechain$
DECLARE
    pgsc_fan_in text;       -- the step the group stage follows
    pgsc_group_stage text;  -- that group stage
    pgsc_policy text;       -- its FanIn, by value
    pgsc_members bigint;
    pgsc_done bigint;
    pgsc_failed bigint;
    pgsc_expected bigint;
    pgsc_verdict text;      -- 'formed', 'failed' or NULL (not yet)
    pgsc_at int;            -- the member step's place in the arrays below
    pgsc_reason text;
BEGIN
    IF {landed_on_done} THEN
        {announce_row}
    END IF;
    -- cheap tests first: most rows land on steps no group waits for
    IF NEW.{group} IS NOT NULL AND {moved}
            AND ((NEW.{status} = {done} AND NEW.{step} = ANY({fan_in_steps}))
                 OR (NEW.{status} = {failed} AND NEW.{step} = ANY({member_steps}))) THEN
        {form_group}
    END IF;
    RETURN NULL;
END
$pgstagechain$

-- fragment: moved
-- a real change of (step, status): claims set running and never get here (see WHEN)
(TG_OP = 'INSERT' OR OLD.{step} IS DISTINCT FROM NEW.{step}
    OR OLD.{status} IS DISTINCT FROM NEW.{status})

-- fragment: landed_on_done
-- Only a real change to (step, status) that lands on done wakes anybody: claims (status
-- running) and no-op updates send nothing.
NEW.{status} = {done} AND {moved}

-- fragment: announce_row
-- on the channel of the key's partition, which only the worker that owns it listens to
IF NEW.{step} = ANY({row_steps}) THEN
    PERFORM pg_notify(pgstagechain.partition_channel({channel}, NEW.{key}::text),
        json_build_array('r', NEW.{step}, NEW.{key}::text, {new_group})::text);
END IF;

-- fragment: form_group
-- Fan-in. A member matters to its group when it lands on the step the group stage follows
-- (done), or fails for good at a step of the chain leading there under a policy that acts
-- on failures. Then, under the group's lock, count every member with a fresh snapshot and
-- apply the group stage's policy: the group forms (its row appears at (fan-in step, done),
-- whose own trigger wakes the group stage), fails with a recorded reason, or waits. A
-- declared group size keeps it waiting until that many members exist.
-- (array lookups, not a query: this runs for every member landing on its fan-in step)
pgsc_at := array_position({member_steps}, NEW.{step}::text);
pgsc_fan_in := ({member_fan_ins})[pgsc_at];
pgsc_group_stage := ({member_group_stages})[pgsc_at];
pgsc_policy := ({member_policies})[pgsc_at];
IF pgsc_fan_in IS NOT NULL AND (
        (NEW.{status} = {done} AND NEW.{step} = pgsc_fan_in)
        OR (NEW.{status} = {failed} AND pgsc_policy <> 'all_done')) THEN
    PERFORM pg_advisory_xact_lock(hashtextextended({pipeline_name} || ':' || NEW.{group}::text, 0));
    SELECT count(*),
           count(*) FILTER (WHERE m.{step} = pgsc_fan_in AND m.{status} = {done}),
           count(*) FILTER (WHERE m.{status} = {failed} AND m.{step} = ANY({member_steps})),
           {expected_size}
    INTO pgsc_members, pgsc_done, pgsc_failed, pgsc_expected
    FROM {table} m WHERE m.{group} = NEW.{group};
    IF pgsc_policy = 'fail_fast' AND pgsc_failed > 0 THEN
        pgsc_verdict := 'failed';
    ELSIF pgsc_expected IS NOT NULL AND pgsc_members < pgsc_expected THEN
        pgsc_verdict := NULL;  -- members still to come
    ELSIF pgsc_done = pgsc_members THEN
        pgsc_verdict := 'formed';
    ELSIF pgsc_policy = 'settled' AND pgsc_done + pgsc_failed = pgsc_members THEN
        pgsc_verdict := CASE WHEN pgsc_done > 0 THEN 'formed' ELSE 'failed' END;
    END IF;
    IF pgsc_verdict = 'formed' THEN
        INSERT INTO pgstagechain.groups (pipeline, group_key, step, status)
        VALUES ({pipeline_name}, NEW.{group}::text, pgsc_fan_in, 'done')
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            -- It formed before and a member changed since (a retry, a re-run): it forms
            -- again, once; a group stage still at work on the old members is cancelled.
            pgsc_reason := 'cancelled: the group formed again (member ' || NEW.{key}::text
                || ' reached (' || NEW.{step} || ', ' || NEW.{status} || ') after it formed)';
            {reform_group}
        END IF;
    ELSIF pgsc_verdict = 'failed' AND (
            SELECT g.status FROM pgstagechain.groups g
            WHERE g.group_key = NEW.{group}::text AND g.pipeline = {pipeline_name})
            IS DISTINCT FROM 'failed' THEN
        SELECT CASE WHEN pgsc_policy = 'fail_fast'
                    THEN 'fan-in FAIL_FAST: member ' || m.{key}::text || ' failed at '
                         || m.{step} || coalesce(': ' || last.error, '')
                    ELSE 'fan-in SETTLED: every member failed (' || pgsc_members
                         || '), the last was ' || m.{key}::text || ' at ' || m.{step}
                         || coalesce(': ' || last.error, '') END
        INTO pgsc_reason
        FROM {table} m
        LEFT JOIN LATERAL (
            SELECT r.error FROM pgstagechain.runs r
            WHERE r.pipeline = {pipeline_name} AND r.row_key = m.{key}::text
              AND r.stage = m.{step}
            ORDER BY r.id DESC LIMIT 1
        ) last ON true
        WHERE m.{group} = NEW.{group} AND m.{status} = {failed}
        ORDER BY m.{key} = NEW.{key} DESC, m.{key}
        LIMIT 1;
        {reform_group}
        UPDATE pgstagechain.groups SET step = pgsc_group_stage, status = 'failed'
        WHERE group_key = NEW.{group}::text AND pipeline = {pipeline_name};
        IF NOT FOUND THEN
            INSERT INTO pgstagechain.groups (pipeline, group_key, step, status)
            VALUES ({pipeline_name}, NEW.{group}::text, pgsc_group_stage, 'failed');
        END IF;
        -- the reason, where failures and history look: a failed run of the group stage
        INSERT INTO pgstagechain.runs (pipeline, stage, row_key, group_key, attempt, state,
                                       worker_id, lease_until, finished_at, error)
        SELECT {pipeline_name}, pgsc_group_stage, NEW.{group}::text, NEW.{group}::text,
               1 + coalesce(max(r.attempt), 0), 'failed', 'pgstagechain-fan-in',
               clock_timestamp(), clock_timestamp(), pgsc_reason
        FROM pgstagechain.runs r
        WHERE r.pipeline = {pipeline_name} AND r.row_key = NEW.{group}::text
          AND r.stage = pgsc_group_stage;
    END IF;
END IF;

-- fragment: reform_group
-- Close the group's live run (its completion then finds it gone and is rolled back with its
-- writes) and drop a pending retry, as a cancel does, then put the group back at (fan-in
-- step, done): its stages run again from the first.
UPDATE pgstagechain.runs r SET state = 'cancelled', finished_at = clock_timestamp(),
                               error = pgsc_reason
WHERE r.pipeline = {pipeline_name} AND r.row_key = NEW.{group}::text
  AND r.stage = ANY({group_stage_names}) AND r.state = 'running';
UPDATE pgstagechain.runs r SET retry_at = NULL, error = concat_ws(E'\n', r.error, pgsc_reason)
WHERE r.pipeline = {pipeline_name} AND r.row_key = NEW.{group}::text
  AND r.stage = ANY({group_stage_names}) AND r.retry_at IS NOT NULL;
UPDATE pgstagechain.groups SET step = pgsc_fan_in, status = 'done',
                               updated_at = clock_timestamp()
WHERE group_key = NEW.{group}::text AND pipeline = {pipeline_name}
  AND (step, status) IS DISTINCT FROM (pgsc_fan_in, 'done');

-- name: create_trigger
-- WHEN is checked without calling the function: the many updates that claim a row (status
-- running) cost no trigger call at all. Failures wake it only when a fan-in policy acts on
-- them.
CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OF {step}, {status} ON {table}
FOR EACH ROW WHEN (NEW.{status} = ANY({wake_statuses})) EXECUTE FUNCTION {function}()

-- name: drop_trigger
DROP TRIGGER IF EXISTS {trigger} ON {table}

-- name: drop_function
DROP FUNCTION IF EXISTS {function}()

-- name: leading_index
-- an index (not partial) that leads with these columns, whoever made it
SELECT 1 FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
LEFT JOIN pg_attribute b ON b.attrelid = i.indrelid AND b.attnum = i.indkey[1]
WHERE i.indrelid = to_regclass(format('%%I.%%I', %(schema)s::text, %(table)s::text))
  AND i.indpred IS NULL AND a.attname = %(first)s
  AND (%(second)s::text IS NULL OR b.attname = %(second)s)
LIMIT 1

-- name: relation_exists
SELECT to_regclass(format('%%I.%%I', %(schema)s::text, %(name)s::text)) IS NOT NULL

-- name: create_state_index
CREATE INDEX {concurrently} IF NOT EXISTS {state_index} ON {table} ({step}, {status})

-- name: create_group_index
CREATE INDEX {concurrently} IF NOT EXISTS {group_index} ON {table} ({group})

-- name: drop_state_index
DROP INDEX IF EXISTS {state_index_in_schema}

-- name: drop_group_index
DROP INDEX IF EXISTS {group_index_in_schema}

-- name: install_lock
SELECT pg_advisory_xact_lock(hashtext(%(lock)s))

-- name: installed_config
SELECT config FROM pgstagechain.pipelines WHERE name = %(pipeline)s

-- name: installed_objects
SELECT created FROM pgstagechain.pipelines WHERE name = %(pipeline)s

-- name: record_install
INSERT INTO pgstagechain.pipelines (name, table_schema, table_name, config, created)
VALUES (%(pipeline)s, %(schema)s, %(table)s, %(config)s, %(created)s)
ON CONFLICT (name) DO UPDATE SET table_schema = EXCLUDED.table_schema,
    table_name = EXCLUDED.table_name, config = EXCLUDED.config,
    created = EXCLUDED.created, installed_at = now()

-- name: forget_install
DELETE FROM pgstagechain.pipelines WHERE name = %(pipeline)s

-- name: purge_runs
DELETE FROM pgstagechain.runs WHERE pipeline = %(pipeline)s

-- name: purge_groups
DELETE FROM pgstagechain.groups WHERE pipeline = %(pipeline)s

-- name: count_done_rows
SELECT count(*) FROM {table} WHERE {step} = %(step)s AND {status} = %(done)s

-- name: count_done_groups
SELECT count(*) FROM pgstagechain.groups
WHERE pipeline = %(pipeline)s AND step = %(step)s AND status = 'done'

-- name: skip_rows
-- rows that finished at a step, moved past stages added after it without running them
UPDATE {table} SET {step} = %(target)s WHERE {step} = %(step)s AND {status} = %(done)s

-- name: skip_groups
UPDATE pgstagechain.groups SET step = %(target)s
WHERE pipeline = %(pipeline)s AND step = %(step)s AND status = 'done'
