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
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $pgstagechain$
BEGIN
    IF {landed_on_done} THEN
        {announce_row}
        {form_group}
    END IF;
    RETURN NULL;
END
$pgstagechain$

-- fragment: landed_on_done
-- Only a real change to (step, status) that lands on done wakes anybody: claims (status
-- running) and no-op updates send nothing.
NEW.{status} = {done} AND (TG_OP = 'INSERT'
    OR OLD.{step} IS DISTINCT FROM NEW.{step} OR OLD.{status} IS DISTINCT FROM NEW.{status})

-- fragment: announce_row
IF NEW.{step} = ANY({row_steps}) THEN
    PERFORM pg_notify({channel}, json_build_array(
        'r', NEW.{step}, NEW.{key}::text, {new_group})::text);
END IF;

-- fragment: form_group
-- Fan-in: when a member reaches a step followed by a group stage, take the group's lock and
-- look at every member with a fresh snapshot; the last one in creates the group's row (at
-- most once: primary key), whose own trigger wakes the group stage.
IF NEW.{step} = ANY({fan_in_steps}) AND NEW.{group} IS NOT NULL THEN
    PERFORM pg_advisory_xact_lock(hashtextextended({pipeline_name} || ':' || NEW.{group}::text, 0));
    IF NOT EXISTS (
        SELECT 1 FROM {table} m
        WHERE m.{group} = NEW.{group}
          AND (m.{step} IS DISTINCT FROM NEW.{step} OR m.{status} IS DISTINCT FROM {done})
    ) THEN
        INSERT INTO pgstagechain.groups (pipeline, group_key, step, status)
        VALUES ({pipeline_name}, NEW.{group}::text, NEW.{step}, 'done')
        ON CONFLICT DO NOTHING;
    END IF;
END IF;

-- name: create_trigger
-- WHEN is checked without calling the function: the many updates that claim a row (status
-- running) cost no trigger call at all.
CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OF {step}, {status} ON {table}
FOR EACH ROW WHEN (NEW.{status} = {done}) EXECUTE FUNCTION {function}()

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
