-- Which listening workers serve which stage: one shared advisory lock per (pipeline, stage)
-- held by each worker's listening connection, released by the server when it ends
-- (see _membership.py). Lock keys are two 31-bit numbers, so pg_locks shows them as they
-- were given (classid = the pipeline's, objid = the stage's, objsubid = 2).

-- name: join_members
-- On the listening connection: take the locks, then tell the other workers.
SELECT pg_notify(%(channel)s, %(payload)s)
FROM (SELECT count(*) FROM unnest(%(stage_numbers)s::int[]) AS s(number),
      LATERAL pg_advisory_lock_shared(%(pipeline_number)s, s.number)) AS taken

-- name: left_members
-- On another connection, once the listening one is closed: tell the other workers.
SELECT pg_notify(%(channel)s, %(payload)s)

-- fragment: live_members
-- The live members of each stage: stage number (as text) → listening backend pids.
(SELECT json_object_agg(m.number, m.pids) FROM (
    SELECT l.objid::bigint AS number, json_agg(l.pid ORDER BY l.pid) AS pids
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND l.granted
      AND l.classid::bigint = %(pipeline_number)s
      AND l.database = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database())
    GROUP BY l.objid) AS m)

-- name: worker_probe
-- A worker's scan in one statement: the probe (see recovery.sql), the live members (none
-- without a pipeline number: a worker that does not listen), and what tells the worker
-- whether `migrate` installed another graph or the stage limits changed, so that it reads
-- them only then.
SELECT p.*, {live_members} AS members,
       (SELECT c.config ->> 'digest' FROM pgstagechain.pipelines c
        WHERE c.name = %(pipeline)s) AS digest,
       (SELECT md5(string_agg(format('%%s:%%s:%%s:%%s', l.stage, l.max_running,
                                     l.max_per_second, l.burst), ',' ORDER BY l.stage))
        FROM pgstagechain.stage_limits l WHERE l.pipeline = %(pipeline)s) AS limits_stamp
FROM ({pending}) AS p
