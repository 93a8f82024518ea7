"""The statements a pipeline runs, composed once from its configuration.

Identifiers from configuration go through :class:`psycopg.sql.Identifier`; the only
other fragments are type names read from the catalog by ``format_type`` (already
quoted by PostgreSQL). Each statement is one round trip and one atomic step.
"""

from __future__ import annotations

from typing import Any

from psycopg import sql

from ._catalog import TableInfo
from ._pipeline import Pipeline

GROUPS = sql.SQL("pgstagechain.groups")
RUNS = sql.SQL("pgstagechain.runs")
# Results of the earlier stages of the claimed row `c`, looked up per key.
EARLIER_RESULTS = sql.SQL("""
        LEFT JOIN LATERAL (
            SELECT jsonb_object_agg(r.stage, r.result ORDER BY r.id) AS results
            FROM pgstagechain.runs r
            WHERE cardinality(%(ancestors)s::text[]) > 0  -- else not even looked up
              AND r.pipeline = %(pipeline)s AND r.row_key = c.row_key
              AND r.stage = ANY(%(ancestors)s::text[]) AND r.state = 'succeeded'
              AND r.result IS NOT NULL
        ) earlier ON c.run_id IS NOT NULL""")


# Members of the claimed group `c`, each with the results of its row stages: the group
# column compared in its own type so that its index serves.
MEMBERS = sql.SQL("""
        LEFT JOIN LATERAL (
            SELECT jsonb_object_agg(m.row_key, coalesce(mr.results, '{{}}'::jsonb)) AS members
            FROM (SELECT t.{key}::text AS row_key FROM {table} t
                  WHERE t.{group} = c.group_key::{group_type}) m
            LEFT JOIN LATERAL (
                SELECT jsonb_object_agg(r.stage, r.result ORDER BY r.id) AS results
                FROM pgstagechain.runs r
                WHERE r.pipeline = %(pipeline)s AND r.row_key = m.row_key
                  AND r.stage = ANY(%(row_stages)s::text[]) AND r.state = 'succeeded'
                  AND r.result IS NOT NULL
            ) mr ON TRUE
        ) mem ON c.run_id IS NOT NULL""")

# Live runs whose lease ran out, found through their rows: a row (or group) at
# (stage, running) leads to its run by the history index, so the cost follows the rows
# being worked on, not the ledger. `deep` also reads the ledger itself, for runs whose
# row was moved on by hand while they ran.
EXPIRED_RUNS = sql.SQL("""
        SELECT r.id FROM {table} t
        JOIN pgstagechain.runs r
          ON r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text AND r.stage = t.{step}
        WHERE t.{step} = ANY(%(row_stages)s::text[]) AND t.{status} = %(running)s
          AND r.state = 'running' AND r.lease_until < clock_timestamp()
        UNION ALL
        SELECT r.id FROM pgstagechain.groups g
        JOIN pgstagechain.runs r
          ON r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = g.step
        WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_stages)s::text[])
          AND g.status = 'running' AND r.state = 'running'
          AND r.lease_until < clock_timestamp()
        UNION ALL
        SELECT r.id FROM pgstagechain.runs r
        WHERE %(deep)s AND r.pipeline = %(pipeline)s AND r.state = 'running'
          AND r.lease_until < clock_timestamp()""")


# Is any row (or group) at (stage, running) held by nothing any more? Its run's lease ran
# out (the worker died), or it has no live run at all (a claim lost in a server crash, a
# row set to running by hand). Found through the rows being worked on, each leading to
# its runs by the history index. A retry pending holds the row too.
STUCK = sql.SQL("""
        SELECT 1 FROM {table} t
        WHERE t.{step} = ANY(%(row_stages)s::text[]) AND t.{status} = %(running)s
          AND NOT EXISTS (
              SELECT 1 FROM pgstagechain.runs r
              WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text
                AND r.stage = t.{step} AND {holds})
        UNION ALL
        SELECT 1 FROM pgstagechain.groups g
        WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_stages)s::text[])
          AND g.status = 'running'
          AND NOT EXISTS (
              SELECT 1 FROM pgstagechain.runs r
              WHERE r.pipeline = g.pipeline AND r.row_key = g.group_key AND r.stage = g.step
                AND {holds})""")
#: a run that holds its row: live, or failed with a retry pending
HOLDS_LIVE = sql.SQL("(r.state = 'running' OR r.retry_at IS NOT NULL)")
#: the same, except that a live run whose lease ran out holds nothing
HOLDS_LEASED = sql.SQL(
    "((r.state = 'running' AND r.lease_until >= clock_timestamp()) OR r.retry_at IS NOT NULL)"
)


class Queries:
    """Rendered SQL for one pipeline. Build with :meth:`for_pipeline`."""

    def __init__(self, pipeline: Pipeline, info: TableInfo) -> None:
        spec = pipeline.table
        self.pipeline = pipeline
        self.info = info
        table = sql.Identifier(spec.schema, spec.table)
        key = sql.Identifier(spec.key)
        step = sql.Identifier(spec.step_column)
        status = sql.Identifier(spec.status_column)
        key_array = sql.SQL(info.key_type + "[]")
        key_type = sql.SQL(info.key_type)
        group_expr = (
            sql.SQL("t.{}::text").format(sql.Identifier(spec.group_column))
            if spec.group_column
            else sql.SQL("NULL::text")
        )
        extras = sql.SQL("").join(
            sql.SQL(", t.{} AS {}").format(sql.Identifier(c), sql.Identifier("x_" + c))
            for c in spec.extra_columns
        )
        fmt: dict[str, Any] = dict(
            table=table,
            key=key,
            step=step,
            status=status,
            key_array=key_array,
            key_type=key_type,
            group_expr=group_expr,
            extras=extras,
            runs=RUNS,
            groups=GROUPS,
            earlier=EARLIER_RESULTS,
            # a claim's token, drawn at random: it proves the claim in every later statement
            token=sql.SQL("gen_random_uuid() AS token, NULL::uuid AS series"),
            retry_token=sql.SQL("gen_random_uuid() AS token, c.series"),
        )
        fmt["expired_runs"] = EXPIRED_RUNS.format(**fmt)
        fmt["holds_live"] = HOLDS_LIVE
        fmt["stuck"] = STUCK.format(holds=HOLDS_LEASED, **fmt)
        # group stages need a group column (validated): their claims carry the members
        fmt["members"] = (
            MEMBERS.format(
                group=sql.Identifier(spec.group_column),
                group_type=sql.SQL(info.group_type or "text"),
                **fmt,
            )
            if spec.group_column
            else sql.SQL("")
        )
        fmt["members_column"] = sql.SQL(", mem.members" if spec.group_column else "")

        # Shared tail of every claim: record the run in the ledger in the same statement,
        # then return what the handler's context needs.
        # The run ids and tokens are drawn in `claimed` so the result needs no join back to
        # `runs` (a first attempt starts its own series: series = token);
        # the results of earlier stages come along (per key, through the history index).
        record_runs = """
        runs AS (
            INSERT INTO {runs} (id, pipeline, stage, row_key, group_key, attempt, worker_id,
                                lease_until, token, series)
            OVERRIDING SYSTEM VALUE
            SELECT c.run_id, %(pipeline)s, %(stage)s, c.row_key, c.group_key, c.attempt,
                   %(worker)s, clock_timestamp() + %(lease)s * interval '1 second',
                   c.token, coalesce(c.series, c.token)
            FROM claimed c
        )
        SELECT c.*, earlier.results {also} FROM claimed c {earlier} {joined}
        """
        row_tail = {"also": sql.SQL(""), "joined": sql.SQL("")}
        # a group's claim carries its members, so its handler needs no other round trip
        group_tail = {"also": fmt["members_column"], "joined": fmt["members"]}

        # Verify-then-claim for row stages, as one statement: lock the rows that are
        # still at (after, done), skipping rows another claimer holds; move them to
        # (stage, running); record the runs. Given keys are found by key (the state
        # test kept out of the index choice: `IS NOT DISTINCT FROM`), any ready rows
        # through the state index.
        row_claim = (
            """
        WITH picked AS (
            SELECT t.{key} AS k FROM {table} t
            WHERE {pick}
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ),
        claimed AS (
            UPDATE {table} t SET {step} = %(stage)s, {status} = %(running)s
            WHERE t.{key} = ANY(ARRAY(SELECT k FROM picked))
            RETURNING t.{key} AS key, t.{key}::text AS row_key, {group_expr} AS group_key,
                      1 AS attempt, nextval('pgstagechain.runs_id_seq') AS run_id,
                      {token} {extras}
        ),
        """
            + record_runs
        )
        self.claim_rows_by_key = self._render(
            row_claim,
            fmt,
            **row_tail,
            pick=sql.SQL(
                "t.{key} = ANY(%(keys)s::text[]::{key_array}) AND t.{step} IS NOT DISTINCT FROM"
                " %(after)s AND t.{status} IS NOT DISTINCT FROM %(done)s"
            ).format(**fmt),
        )
        self.claim_rows_ready = self._render(
            row_claim,
            fmt,
            **row_tail,
            pick=sql.SQL("t.{step} = %(after)s AND t.{status} = %(done)s").format(**fmt),
        )

        # The same for group stages, on the group table.
        group_claim = (
            """
        WITH picked AS (
            SELECT g.ctid FROM {groups} g
            WHERE {pick}
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ),
        claimed AS (
            UPDATE {groups} g SET step = %(stage)s, status = 'running',
                                  updated_at = clock_timestamp()
            WHERE g.ctid = ANY(ARRAY(SELECT ctid FROM picked))  -- locked: it cannot move
            RETURNING g.group_key AS key, g.group_key AS row_key, g.group_key, 1 AS attempt,
                      nextval('pgstagechain.runs_id_seq') AS run_id, {token}
        ),
        """
            + record_runs
        )
        self.claim_groups_by_key = self._render(
            group_claim,
            fmt,
            **group_tail,
            pick=sql.SQL(
                "g.group_key = ANY(%(keys)s::text[]) AND g.pipeline IS NOT DISTINCT FROM"
                " %(pipeline)s AND g.step IS NOT DISTINCT FROM %(after)s"
                " AND g.status IS NOT DISTINCT FROM 'done'"
            ),
        )
        self.claim_groups_ready = self._render(
            group_claim,
            fmt,
            **group_tail,
            pick=sql.SQL("g.step = %(after)s AND g.status = 'done' AND g.pipeline = %(pipeline)s"),
        )

        # Retries whose time has come: consume the pending retry of the failed run and
        # open the next attempt, provided the row is still ours at (stage, running).
        retry_claim = (
            """
        WITH due AS (
            SELECT r.id FROM {runs} r
            WHERE r.retry_at <= clock_timestamp() AND r.pipeline = %(pipeline)s
              AND r.stage = %(stage)s
            ORDER BY r.retry_at
            LIMIT %(limit)s
            FOR UPDATE SKIP LOCKED
        ),
        consumed AS (
            UPDATE {runs} r SET retry_at = NULL FROM due WHERE r.id = due.id
            RETURNING r.row_key, r.attempt, r.series
        ),
        claimed AS (
            {owner}
        ),
        """
            + record_runs
        )
        self.claim_row_retries = self._render(
            retry_claim,
            fmt,
            **row_tail,
            owner=sql.SQL(
                """SELECT t.{key} AS key, c.row_key, {group_expr} AS group_key,
                      c.attempt + 1 AS attempt, nextval('pgstagechain.runs_id_seq') AS run_id,
                      {retry_token} {extras}
               FROM consumed c JOIN {table} t ON t.{key} = c.row_key::{key_type}
               WHERE t.{step} = %(stage)s AND t.{status} = %(running)s"""
            ).format(**fmt),
        )
        self.claim_group_retries = self._render(
            retry_claim,
            fmt,
            **group_tail,
            owner=sql.SQL(
                """SELECT g.group_key AS key, c.row_key, g.group_key, c.attempt + 1 AS attempt,
                      nextval('pgstagechain.runs_id_seq') AS run_id, {retry_token}
               FROM consumed c JOIN {groups} g
                 ON g.pipeline = %(pipeline)s AND g.group_key = c.row_key
               WHERE g.step = %(stage)s AND g.status = 'running'"""
            ).format(**fmt),
        )

        # Completion: close the runs still ours (a rescued claim is not) and mark their rows
        # done, which fires the trigger and so the next stage. A row stage may instead go
        # straight on to the next stage on this worker (`chain`): the row moves from
        # (stage, running) to (next, running) with the next run recorded, in the same
        # statement; it never lands on done, so nobody else is woken for it.
        # Each run is named by id and token (its claim's proof: ids can repeat after a crash,
        # tokens cannot), with its result beside it in the input arrays.
        # Each part is driven by the input arrays or by an array built once from the part
        # before (never a join of two CTEs, which the planner, blind to their sizes, would
        # make quadratic). Rows are found
        # by key: `IS NOT DISTINCT FROM` keeps the state index out of it, whose statistics
        # are always stale during a burst. The rows give the completed run ids, then the
        # new claims; the result just stored is not visible here, the caller adds it.
        complete = """
            WITH run AS (
                UPDATE {runs} r SET state = 'succeeded', finished_at = clock_timestamp(),
                                     result = mine.result::jsonb
                FROM unnest(%(run_ids)s::bigint[], %(tokens)s::uuid[], %(results)s::text[])
                     AS mine(id, token, result)
                WHERE r.id = mine.id AND r.token = mine.token AND r.state = 'running'
                RETURNING r.token, r.row_key
            ),
            claimed AS (
                {move}
            ),
            runs AS (
                INSERT INTO {runs} (id, pipeline, stage, row_key, group_key, attempt, worker_id,
                                    lease_until, token, series)
                OVERRIDING SYSTEM VALUE
                SELECT c.run_id, %(pipeline)s, %(next)s, c.row_key, c.group_key, 1, %(worker)s,
                       clock_timestamp() + %(lease)s * interval '1 second', c.token, c.token
                FROM claimed c WHERE c.chain
            )
            SELECT NULL::uuid AS completed, c.key, c.row_key, c.group_key, c.attempt,
                   c.chain, c.run_id, c.token {extra_names}, earlier.results {also}
            FROM claimed c {earlier} {joined} WHERE c.chain
            UNION ALL
            SELECT run.token, {nulls} FROM run
            """

        def nulls(count: int) -> sql.Composable:
            return sql.SQL(", ").join([sql.SQL("NULL")] * count)

        self.complete_rows = self._render(
            complete,
            fmt,
            move=sql.SQL(
                """UPDATE {table} t
                SET {step} = CASE WHEN %(chain)s::bool THEN %(next)s ELSE t.{step} END,
                    {status} = CASE WHEN %(chain)s::bool THEN %(running)s ELSE %(done)s END
                WHERE t.{key} = ANY(ARRAY(SELECT run.row_key::{key_type} FROM run))
                  AND t.{step} IS NOT DISTINCT FROM %(stage)s
                  AND t.{status} IS NOT DISTINCT FROM %(running)s
                RETURNING t.{key} AS key, t.{key}::text AS row_key, {group_expr} AS group_key,
                          1 AS attempt, t.{status} = %(running)s AS chain,
                          CASE WHEN t.{status} = %(running)s
                               THEN nextval('pgstagechain.runs_id_seq') END AS run_id,
                          CASE WHEN t.{status} = %(running)s
                               THEN gen_random_uuid() END AS token {extras}"""
            ).format(**fmt),
            extra_names=sql.SQL("").join(
                sql.SQL(", c.{}").format(sql.Identifier("x_" + c)) for c in spec.extra_columns
            ),
            nulls=nulls(8 + len(spec.extra_columns)),
            **row_tail,
        )
        # The same for group stages, on the group table; a group may go straight on to
        # the next group stage, with its members.
        self.complete_groups = self._render(
            complete,
            fmt,
            move=sql.SQL(
                """UPDATE {groups} g
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
                          CASE WHEN g.status = 'running'
                               THEN gen_random_uuid() END AS token"""
            ).format(**fmt),
            extra_names=sql.SQL(""),
            nulls=nulls(8 + (1 if spec.group_column else 0)),
            **group_tail,
        )

        # Failure: close the run; when no retry is pending the row (or group) fails too.
        fail_tail = """
        WITH run AS (
            UPDATE {runs} SET state = %(state)s, finished_at = clock_timestamp(),
                               error = %(error)s,
                               retry_at = clock_timestamp() + %(retry_in)s * interval '1 second'
            WHERE id = %(run_id)s AND token = %(token)s AND state = 'running'
            RETURNING row_key, retry_at
        ),
        moved AS (
            {move}
        )
        SELECT retry_at FROM run
        """
        self.fail_row = self._render(
            fail_tail,
            fmt,
            move=sql.SQL(
                """UPDATE {table} t SET {status} = %(failed)s FROM run
                WHERE run.retry_at IS NULL AND t.{key} = run.row_key::{key_type}
                  AND t.{step} = %(stage)s AND t.{status} = %(running)s
                RETURNING 1"""
            ).format(**fmt),
        )
        self.fail_group = self._render(
            fail_tail,
            fmt,
            move=sql.SQL(
                """UPDATE {groups} g SET status = 'failed', updated_at = clock_timestamp()
                FROM run
                WHERE run.retry_at IS NULL AND g.pipeline = %(pipeline)s
                  AND g.group_key = run.row_key AND g.step = %(stage)s AND g.status = 'running'
                RETURNING 1"""
            ).format(**fmt),
        )

        # Leases: renewed for every run a worker holds in one statement; expired ones are
        # closed and re-driven (a retry now if attempts remain, else the row fails). Runs a
        # worker hands back are named by id and token, like a completion.
        self.renew_leases = self._render(
            """
            UPDATE {runs} r SET lease_until = clock_timestamp() + %(lease)s * interval '1 second'
            FROM unnest(%(run_ids)s::bigint[], %(tokens)s::uuid[]) AS mine(id, token)
            WHERE r.id = mine.id AND r.token = mine.token AND r.state = 'running'
            RETURNING r.token
            """,
            fmt,
        )
        self.expire_leases = self._render(
            """
            WITH policy AS (
                SELECT * FROM unnest(%(stages)s::text[], %(afters)s::text[],
                                     %(max_attempts)s::int[], %(is_group)s::bool[])
                              AS p(stage, after, max_attempts, is_group)
            ),
            expired AS (
                UPDATE {runs} r SET state = 'expired', finished_at = clock_timestamp(),
                    error = coalesce(%(reason)s, 'lease expired: worker ' || r.worker_id
                                     || ' stopped renewing it (crashed, frozen or cut off)'),
                    -- (the caller raises max_attempts for dead workers, whose death is not
                    -- the handler's fault)
                    retry_at = CASE WHEN r.attempt < p.max_attempts OR %(free)s
                                    THEN clock_timestamp() END
                FROM policy p
                WHERE r.id = ANY(ARRAY({expired_runs}) || ARRAY(
                        SELECT x.id FROM unnest(%(run_ids)s::bigint[], %(tokens)s::uuid[])
                                         AS mine(id, token)
                        JOIN {runs} x ON x.id = mine.id AND x.token = mine.token))
                  AND r.pipeline = %(pipeline)s AND r.stage = p.stage AND r.state = 'running'
                RETURNING r.row_key, r.stage, r.retry_at, p.is_group
            ),
            -- Rows (groups) at (stage, running) that no run holds: the claim is undone, the
            -- row goes back to (previous step, done), whose notification brings a worker.
            -- An update, so that two scanners at once repair a row once (the second finds
            -- it moved when the first commits).
            unheld_rows AS (
                UPDATE {table} t SET {step} = p.after, {status} = %(done)s FROM policy p
                WHERE t.{step} = p.stage AND NOT p.is_group AND t.{status} = %(running)s
                  AND NOT EXISTS (
                      SELECT 1 FROM {runs} r
                      WHERE r.pipeline = %(pipeline)s AND r.row_key = t.{key}::text
                        AND r.stage = p.stage AND {holds_live})
                RETURNING t.{key}::text AS row_key, p.stage, p.after, {group_expr} AS group_key
            ),
            unheld_groups AS (
                UPDATE {groups} g SET step = p.after, status = 'done',
                                      updated_at = clock_timestamp()
                FROM policy p
                WHERE g.pipeline = %(pipeline)s AND g.step = p.stage AND p.is_group
                  AND g.status = 'running'
                  AND NOT EXISTS (
                      SELECT 1 FROM {runs} r
                      WHERE r.pipeline = g.pipeline AND r.row_key = g.group_key
                        AND r.stage = p.stage AND {holds_live})
                RETURNING g.group_key AS row_key, p.stage, p.after, g.group_key
            ),
            -- and the history says what happened
            unheld AS (
                INSERT INTO {runs} (pipeline, stage, row_key, group_key, attempt, state,
                                    worker_id, lease_until, finished_at, error)
                SELECT %(pipeline)s, u.stage, u.row_key, u.group_key,
                       1 + coalesce((SELECT max(r.attempt) FROM {runs} r
                                     WHERE r.pipeline = %(pipeline)s AND r.row_key = u.row_key
                                       AND r.stage = u.stage), 0),
                       'expired', 'pgstagechain-recovery', clock_timestamp(), clock_timestamp(),
                       'no run held it at (' || u.stage || ', running): its claim was lost'
                       || ' (a server crash) or it was set to running by hand; moved back to ('
                       || u.after || ', done) to run the stage again'
                FROM (SELECT * FROM unheld_rows UNION ALL SELECT * FROM unheld_groups) u
                RETURNING row_key, stage
            ),
            failed_rows AS (
                UPDATE {table} t SET {status} = %(failed)s FROM expired e
                WHERE e.retry_at IS NULL AND NOT e.is_group
                  AND t.{key} = e.row_key::{key_type} AND t.{step} = e.stage
                  AND t.{status} = %(running)s
                RETURNING 1
            ),
            failed_groups AS (
                UPDATE {groups} g SET status = 'failed', updated_at = clock_timestamp()
                FROM expired e
                WHERE e.retry_at IS NULL AND e.is_group AND g.pipeline = %(pipeline)s
                  AND g.group_key = e.row_key AND g.step = e.stage AND g.status = 'running'
                RETURNING 1
            )
            -- wake any worker serving the stage: its retry is due now
            SELECT stage, row_key, retry_at IS NOT NULL AS retrying, FALSE AS orphan,
                   CASE WHEN retry_at IS NOT NULL THEN pg_notify(%(channel)s,
                       json_build_array('t', stage, row_key, NULL)::text) END
            FROM expired
            UNION ALL
            SELECT stage, row_key, FALSE, TRUE, NULL FROM unheld
            """,
            fmt,
        )

        # The recovery probe: is there anything a lost notification or a dead worker left?
        # One cheap, index-backed statement per interval while idle.
        self.pending = self._render(
            """
            SELECT
              (SELECT array_agg(DISTINCT s.step) FROM unnest(%(row_steps)s::text[]) AS s(step)
               WHERE EXISTS (SELECT 1 FROM {table} t
                             WHERE t.{step} = s.step AND t.{status} = %(done)s))
                AS ready_row_steps,
              (SELECT array_agg(DISTINCT g.step) FROM {groups} g
               WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_steps)s::text[])
                 AND g.status = 'done')
                AS ready_group_steps,
              EXISTS ({stuck}) AS stuck,
              (SELECT min(r.retry_at) FROM {runs} r
               WHERE r.retry_at IS NOT NULL AND r.pipeline = %(pipeline)s) AS next_retry_at
            """,
            fmt,
        )

        # Re-send the notifications a lost listener missed, for workers elsewhere.
        self.renotify_rows = self._render(
            """
            SELECT count(pg_notify(%(channel)s,
                   json_build_array('r', t.{step}, t.{key}::text, {group_expr})::text))
            FROM (SELECT * FROM {table} t
                  WHERE t.{step} = ANY(%(row_steps)s::text[]) AND t.{status} = %(done)s
                  LIMIT %(limit)s) t
            """,
            fmt,
        )
        self.renotify_groups = self._render(
            """
            SELECT count(pg_notify(%(channel)s,
                   json_build_array('g', g.step, g.group_key, g.group_key)::text))
            FROM (SELECT * FROM {groups} g
                  WHERE g.pipeline = %(pipeline)s AND g.step = ANY(%(group_steps)s::text[])
                    AND g.status = 'done'
                  LIMIT %(limit)s) g
            """,
            fmt,
        )

        # Deep recovery (on demand, not index-bounded): groups whose members all reached a
        # fan-in step while no trigger was there to notice.
        self.form_groups = (
            self._render(
                """
                INSERT INTO {groups} (pipeline, group_key, step, status)
                SELECT %(pipeline)s, t.{group}::text, t.{step}, 'done' FROM {table} t
                WHERE t.{step} = ANY(%(fan_in_steps)s::text[]) AND t.{status} = %(done)s
                  AND t.{group} IS NOT NULL
                GROUP BY t.{group}, t.{step}
                HAVING NOT EXISTS (
                    SELECT 1 FROM {table} m WHERE m.{group} = t.{group}
                      AND (m.{step} IS DISTINCT FROM t.{step} OR m.{status} IS DISTINCT FROM %(done)s))
                ON CONFLICT DO NOTHING
                RETURNING group_key
                """,
                fmt,
                group=sql.Identifier(spec.group_column),
            )
            if spec.group_column
            else None
        )

    @staticmethod
    def _render(template: str, fmt: dict[str, Any], **more: sql.Composable) -> sql.Composed:
        return sql.SQL(template).format(**fmt, **more)
