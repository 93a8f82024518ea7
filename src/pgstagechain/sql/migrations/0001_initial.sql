-- pgstagechain's own tables. The user's table is never altered; a pipeline only adds
-- a trigger, a trigger function and (when missing) indexes on it, recorded in `pipelines`.

CREATE TABLE pgstagechain.pipelines (
    name          text PRIMARY KEY,
    table_schema  text NOT NULL,
    table_name    text NOT NULL,
    config        jsonb NOT NULL,
    -- what install created, so that uninstall removes exactly that
    created       jsonb NOT NULL DEFAULT '{}'::jsonb,
    installed_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per claim: the run ledger. A run is `running` while a worker holds its lease,
-- then `succeeded`, `failed` (retry_at set while a retry is pending), `expired` (the lease
-- ran out: the worker died or froze) or `cancelled`.
CREATE TABLE pgstagechain.runs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pipeline     text NOT NULL,
    stage        text NOT NULL,
    row_key      text NOT NULL,          -- the row's key, or the group key for a group stage
    group_key    text,
    attempt      integer NOT NULL CHECK (attempt >= 1),
    state        text NOT NULL DEFAULT 'running'
                 CHECK (state IN ('running', 'succeeded', 'failed', 'expired', 'cancelled')),
    worker_id    text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until  timestamptz NOT NULL,
    finished_at  timestamptz,
    retry_at     timestamptz,
    error        text,
    result       jsonb
);

-- history of a row (inspect, results of earlier stages)
CREATE INDEX runs_row ON pgstagechain.runs (pipeline, row_key, stage);
-- at most one live claim per (row, stage): a second one is a bug, and fails loudly
CREATE UNIQUE INDEX runs_one_live_claim ON pgstagechain.runs (pipeline, stage, row_key)
    WHERE state = 'running';
-- the rescuer's scans touch only live or pending runs
CREATE INDEX runs_lease ON pgstagechain.runs (lease_until) WHERE state = 'running';
CREATE INDEX runs_retry ON pgstagechain.runs (retry_at) WHERE retry_at IS NOT NULL;
-- status tables and duration figures of recent runs
CREATE INDEX runs_finished ON pgstagechain.runs (pipeline, stage, finished_at)
    WHERE finished_at IS NOT NULL;

-- Group-level (fan-in) state: a row appears when every member of a group has reached the
-- fan-in step, written by the pipeline's trigger under a per-group lock, so it appears
-- exactly once; group stages then move it along like any row.
CREATE TABLE pgstagechain.groups (
    pipeline    text NOT NULL,
    group_key   text NOT NULL,
    step        text NOT NULL,
    status      text NOT NULL CHECK (status IN ('done', 'running', 'failed')),
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (pipeline, group_key)
);
CREATE INDEX groups_state ON pgstagechain.groups (pipeline, step, status);

CREATE FUNCTION pgstagechain.notify_group_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'done' AND (TG_OP = 'INSERT'
            OR OLD.step IS DISTINCT FROM NEW.step OR OLD.status IS DISTINCT FROM NEW.status) THEN
        PERFORM pg_notify('pgstagechain_' || NEW.pipeline,
                          json_build_array('g', NEW.step, NEW.group_key, NEW.group_key)::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER groups_notify AFTER INSERT OR UPDATE OF step, status ON pgstagechain.groups
    FOR EACH ROW EXECUTE FUNCTION pgstagechain.notify_group_done();
