-- Cluster-wide stage limits, enforced by the claim statements themselves.
--
-- `stage_limits` holds a stage's declared limits, written from the code when a pipeline
-- is installed and when a worker starts: `max_running` (live runs at once, over every
-- worker) and a token bucket for `max_per_second` (`burst` tokens at most, `tokens` left
-- at `refilled_at`). A claim of a rate-limited stage locks the stage's row, refills and
-- spends its tokens: rate-limited claims of one stage take turns, which the rate makes
-- rare anyway.
--
-- `stage_slots` holds `max_running` rows per stage. A claim locks free slots with
-- SKIP LOCKED (claims never wait for each other), writes its runs' ids and tokens into
-- them and each slot's number into its run; the statement that closes a run (completion, failure, expiry, hand-back) frees its
-- slot. A slot whose run closed some other way (cancelled by an operator, deleted) is
-- freed by the recovery scan. Neither table is touched by a stage without limits.
CREATE TABLE pgstagechain.stage_limits (
    pipeline       text NOT NULL,
    stage          text NOT NULL,
    max_running    integer CHECK (max_running > 0),
    max_per_second double precision CHECK (max_per_second > 0),
    burst          double precision CHECK (burst >= 1),
    tokens         double precision,
    refilled_at    timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (pipeline, stage),
    CHECK ((max_per_second IS NULL) = (burst IS NULL))
);

CREATE TABLE pgstagechain.stage_slots (
    pipeline text NOT NULL,
    stage    text NOT NULL,
    slot     integer NOT NULL,
    run_id   bigint,
    token    bigint,
    taken_at timestamptz,
    PRIMARY KEY (pipeline, stage, slot)
);

-- The slot a run holds (NULL: none), so that the statement closing it frees the slot by
-- its key. Never indexed, like every column a run's completion writes: a slot taken and
-- freed, like a run completed, is a HOT update.
ALTER TABLE pgstagechain.runs ADD COLUMN slot integer;
