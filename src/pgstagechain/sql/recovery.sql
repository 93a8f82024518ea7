-- Recovery: find what a lost notification, a dead worker or a crash left, and re-drive it
-- through the normal path (a notification, then a claim).

-- name: pending
-- The probe: is there anything to do? One cheap, index-backed statement per interval
-- while idle.
SELECT
  (SELECT array_agg(DISTINCT s.step) FROM unnest(%(row_steps)s::text[]) AS s(step)
   WHERE EXISTS (SELECT 1 FROM {table} t WHERE t.{step} = s.step AND t.{status} = %(done)s))
    AS ready_row_steps,
  (SELECT array_agg(DISTINCT g.step) FROM pgstagechain.groups g
   WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_steps)s::text[])
     AND g.status = 'done')
    AS ready_group_steps,
  EXISTS ({stuck}) AS stuck,
  ({next_retry}) AS next_retry_at

-- fragment: stuck
-- Is any row (or group) at (stage, running) held by nothing any more? Its run's lease ran
-- out (the worker died), or it has no live run at all (a claim lost in a server crash, a
-- row set to running by hand). Found through the rows being worked on, each leading to its
-- runs by the history index. A retry pending holds the row too.
SELECT 1 FROM {table} t
WHERE t.{step} = ANY(%(row_stages)s::text[]) AND t.{status} = %(running)s
  AND NOT EXISTS (
      SELECT 1 FROM pgstagechain.runs r
      WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = t.{step}
        AND {run_holds_lease})
UNION ALL
SELECT 1 FROM pgstagechain.groups g
WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_stages)s::text[])
  AND g.status = 'running'
  AND NOT EXISTS (
      SELECT 1 FROM pgstagechain.runs r
      WHERE r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = g.step
        AND {run_holds_lease})

-- fragment: run_holds_lease
-- a live run holds its row until its lease runs out; a retry pending holds it too
((r.state = 'running' AND r.lease_until >= clock_timestamp()) OR r.retry_at IS NOT NULL)

-- name: next_retry
SELECT min(r.retry_at) FROM pgstagechain.runs r
WHERE r.retry_at IS NOT NULL AND r.pipeline = %(pipeline)s

-- name: renotify_rows
-- Re-send the notifications a lost listener missed, for workers elsewhere.
SELECT count(pg_notify(pgstagechain.partition_channel(%(channel)s, t.{key}::text),
       json_build_array('r', t.{step}, t.{key}::text, {group_expr})::text))
FROM (SELECT * FROM {table} t
      WHERE t.{step} = ANY(%(row_steps)s::text[]) AND t.{status} = %(done)s
      LIMIT %(limit)s) t

-- name: renotify_groups
SELECT count(pg_notify(pgstagechain.partition_channel(%(channel)s, g.group_key),
       json_build_array('g', g.step, g.group_key, g.group_key)::text))
FROM (SELECT * FROM pgstagechain.groups g
      WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_steps)s::text[])
        AND g.status = 'done'
      LIMIT %(limit)s) g

-- name: form_groups
-- Deep recovery (on demand, not index-bounded): groups whose members all reached a fan-in
-- step while no trigger was there to notice (and as many as they declare, if they do).
INSERT INTO pgstagechain.groups (pipeline, group_key, step, status)
SELECT %(pipeline)s, m.{group}::text, m.{step}, 'done' FROM {table} m
WHERE m.{step} = ANY(%(fan_in_steps)s::text[]) AND m.{status} = %(done)s
  AND m.{group} IS NOT NULL
GROUP BY m.{group}, m.{step}
HAVING NOT EXISTS (
    SELECT 1 FROM {table} x WHERE x.{group} = m.{group}
      AND (x.{step} IS DISTINCT FROM m.{step} OR x.{status} IS DISTINCT FROM %(done)s))
  AND count(*) >= coalesce({expected_size}, 0)
ON CONFLICT DO NOTHING
RETURNING group_key
