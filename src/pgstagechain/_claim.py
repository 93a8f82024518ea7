"""Verify-then-claim, completion and failure: each one atomic statement.

The worker drives these in batches; :mod:`._by_hand` exposes the same guarantees to an
application that wants to run a stage by hand (from an HTTP endpoint, a management
command, a test).
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, LiteralString

import attrs
from psycopg import AsyncConnection, Connection

from ._catalog import statements_for
from ._context import Claim, FailedMember
from ._limits import StageLimit, declared_limits, differences, read_limits, write_limits
from ._pipeline import Pipeline
from ._sql import Statements, pipeline_params
from ._stage import Stage
from .errors import ConfigurationError, LeaseLostError

logger = logging.getLogger("pgstagechain.worker")

#: seconds a worker's claim stays its own without a heartbeat
DEFAULT_LEASE = 30.0
#: a claim made by hand (:func:`claim`) has no heartbeat: its lease covers a slow handler
MANUAL_LEASE = 300.0
#: A worker that dies is not the handler's fault: its runs get at least this many attempts.
DEAD_WORKER_ATTEMPTS = 3

#: One run to complete: (run id, its claim's token, row key, result as JSON or None, go on
#: to the next stage)
Completion = tuple[int, int, str, str | None, bool]


def to_json(stage: str, result: Any) -> str | None:
    """Serialise a handler's result, or raise a TypeError that names the stage."""
    if result is None:
        return None
    try:
        return json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"stage {stage!r} returned a result that is not JSON: {exc}") from None


def results_by_token(items: Sequence[Completion]) -> str | None:
    """The results as one JSON object keyed by claim token (None when every result is None)."""
    found = [f'"{token}":{result}' for _, token, _, result, _ in items if result is not None]
    return "{" + ",".join(found) + "}" if found else None


@attrs.frozen
class Held:
    """Why a claim of a limited stage took fewer rows than it could: rows were left for
    lack of a slot (``slots``: a freed slot is announced), or may have been left for lack
    of tokens (``next_token_in``: seconds until the next one)."""

    slots: bool
    next_token_in: float | None


class Claimer:
    """The pipeline's statements, rendered once, with the parameters each needs."""

    def __init__(self, pipeline: Pipeline, statements: Statements) -> None:
        self.pipeline = pipeline
        self.statements = statements
        self._base = {
            **pipeline_params(pipeline),
            "row_stages": [s.name for s in pipeline if not s.group],
            "group_stages": [s.name for s in pipeline if s.group],
            "deep": False,
        }
        self._ancestors: dict[str, list[str]] = {}
        self._chain_targets: dict[str, Stage | None] = {}
        #: the stage limits the database holds (see :mod:`._limits`): their stages are
        #: claimed and completed by statements that obey them
        self.limits: dict[str, StageLimit] = {}
        self._limits_warned: list[str] = []

    async def refresh_limits(self, conn: AsyncConnection[Any], *, write: bool = False) -> None:
        """Obey the stage limits the database holds now; with ``write``, first make them
        the declared ones (a worker starting). Differences from the declared ones (another
        version of the code wrote them) are logged, once for each new difference."""
        if write:
            await write_limits(conn, self.pipeline)
        found = await read_limits(conn, self.pipeline)
        lines = differences(declared_limits(self.pipeline), found)
        if lines and lines != self._limits_warned:
            logger.warning(
                "pipeline %s: the stage limits in the database differ from this code's, and "
                "are the ones obeyed: %s",
                self.pipeline.name,
                "; ".join(lines),
            )
        self._limits_warned = lines
        self.limits = found

    async def free_stale_slots(self, conn: AsyncConnection[Any]) -> int:
        """Free the slots whose run ended without freeing them; return how many."""
        if not any(limit.slotted for limit in self.limits.values()):
            return 0
        cur = await conn.execute(self.text("free_stale_slots"), self.params())
        return len(await cur.fetchall())

    def text(self, name: str) -> LiteralString:
        """The named statement as a string, rendered on first use."""
        return self.statements.text(name)

    def params(self, **more: Any) -> dict[str, Any]:
        return {**self._base, **more}

    def _stage(self, name: str) -> Stage:
        try:
            return self.pipeline[name]
        except KeyError:
            raise ConfigurationError(
                f"pipeline {self.pipeline.name!r} has no stage {name!r}"
            ) from None

    async def claim(
        self,
        conn: AsyncConnection[Any],
        stage: str,
        *,
        keys: Sequence[str] | None = None,
        limit: int = 1,
        worker_id: str,
        lease: float = DEFAULT_LEASE,
        retries: bool = False,
    ) -> list[Claim]:
        """Claim rows of ``stage``: these ``keys`` if given, else any ready ones, else due retries."""
        claims, _ = await self.claim_within_limits(
            conn, stage, keys=keys, limit=limit, worker_id=worker_id, lease=lease, retries=retries
        )
        return claims

    async def claim_within_limits(
        self,
        conn: AsyncConnection[Any],
        stage: str,
        *,
        keys: Sequence[str] | None = None,
        limit: int = 1,
        worker_id: str,
        lease: float = DEFAULT_LEASE,
        retries: bool = False,
    ) -> tuple[list[Claim], Held | None]:
        """:meth:`claim`, and for a stage with limits whether they held rows back."""
        target = self._stage(stage)
        level = "groups" if target.group else "rows"
        if retries:
            name = "claim_group_retries" if target.group else "claim_row_retries"
        else:
            name = f"claim_{level}_by_key" if keys is not None else f"claim_{level}_ready"
        limited = stage in self.limits
        if limited:
            name += "_limited"
        params = self.params(
            stage=stage,
            after=target.after,
            keys=list(keys) if keys is not None else None,
            limit=limit if keys is None else len(keys),
            worker=worker_id,
            lease=lease,
            ancestors=self.ancestors(stage),
        )
        cur = conn.cursor()
        await cur.execute(self.text(name), params)
        make = self._claim_maker(stage, target.group, cur.description)
        rows = await cur.fetchall()
        if not limited:
            return [make(row) for row in rows], None
        # one row at least, which says why; a row without a run claimed nothing
        at = {column.name: i for i, column in enumerate(cur.description or ())}
        first = rows[0]
        wait = first[at["next_token_in"]]
        held = Held(bool(first[at["held_for_slots"]]), float(wait) if wait else None)
        claims = [make(row) for row in rows if row[at["run_id"]] is not None]
        return claims, held if held.slots or held.next_token_in is not None else None

    def _claim_maker(
        self, stage: str, is_group: bool, description: Sequence[Any] | None
    ) -> Callable[[Sequence[Any]], Claim]:
        """Build claims from plain rows: the column positions are looked up once."""
        at = {column.name: i for i, column in enumerate(description or ())}
        run_id, key, row_key, token = at["run_id"], at["key"], at["row_key"], at["token"]
        series = at.get("series")
        group_key, attempt, results = at["group_key"], at["attempt"], at["results"]
        extras = [(name[2:], i) for name, i in at.items() if name.startswith("x_")]
        members = at.get("members")
        failed_members = at.get("failed_members")
        pipeline = self.pipeline.name

        def make(row: Sequence[Any]) -> Claim:
            return Claim(
                pipeline=pipeline,
                stage=stage,
                run_id=row[run_id],
                key=row[key],
                row_key=row[row_key],
                group_key=row[group_key],
                attempt=row[attempt],
                is_group=is_group,
                token=row[token],
                series=row[token] if series is None else row[series] or row[token],
                row={name: row[i] for name, i in extras},
                results=row[results] or {},
                members=(row[members] or {}) if members is not None else {},
                failed_members=(
                    {k: FailedMember(**v) for k, v in row[failed_members].items()}
                    if failed_members is not None and row[failed_members]
                    else {}
                ),
            )

        return make

    def ancestors(self, stage: str) -> list[str]:
        """The stages before ``stage`` on the same level (row or group), cached."""
        found = self._ancestors.get(stage)
        if found is None:
            found = []
            current = self._stage(stage)
            while current.after in self.pipeline:
                previous = self.pipeline[current.after]
                if previous.group != current.group:
                    break
                found.append(previous.name)
                current = previous
            self._ancestors[stage] = found
        return found

    def chain_target(self, stage: str) -> Stage | None:
        """The stage a row (or group) of ``stage`` can go straight on to, if any: the next
        stage on the same level (a fan-in needs all members, so it goes through the
        group table's trigger). A group stage with limits is reached only through its
        claims; a row stage with limits takes the rows its slots and tokens allow."""
        if stage not in self._chain_targets:
            following = self.pipeline.next_stage(stage)
            if following is not None and following.group != self._stage(stage).group:
                following = None
            self._chain_targets[stage] = following
        found = self._chain_targets[stage]
        return None if found is not None and found.group and found.name in self.limits else found

    def _complete_params(
        self,
        stage: str,
        is_group: bool,
        items: Sequence[Completion],
        worker_id: str,
        lease: float,
    ) -> tuple[LiteralString, dict[str, Any]]:
        following = self.chain_target(stage)
        params = self.params(
            stage=stage,
            run_ids=[item[0] for item in items],
            tokens=[item[1] for item in items],
            results=results_by_token(items),
        )
        # one flag for the statement (a per-row test would cost the server per row)
        chain = following is not None and all(item[4] for item in items)
        params.update(
            chain=chain,
            next=following.name if chain and following else None,
            worker=worker_id,
            lease=lease,
            ancestors=self.ancestors(following.name) if chain and following else [],
        )
        name = "complete_groups" if is_group else "complete_rows"
        limit = self.limits.get(stage)
        if chain and following is not None and following.name in self.limits:
            name = "complete_rows_into_limited"  # also frees the runs' slots
        elif limit is not None and limit.slotted:
            name += "_limited"  # frees the runs' slots
        return self.text(name), params

    def _read_completion(
        self,
        stage: str,
        items: Sequence[Completion],
        description: Sequence[Any] | None,
        rows: Sequence[Sequence[Any]],
    ) -> tuple[set[int], dict[int, Claim]]:
        """The tokens of the completed runs (first column), and the chained claims by the
        token of the run they continue (the other rows), with the result just stored added
        to their results."""
        completed = {row[0] for row in rows if row[0] is not None}
        following = self.chain_target(stage)
        chained: dict[int, Claim] = {}
        if following is None or len(completed) == len(rows):
            return completed, chained
        make = self._claim_maker(following.name, following.group, description)
        by_key = {
            key: (token, result)
            for _, token, key, result, chain in items
            if chain and token in completed
        }
        for row in rows:
            if row[0] is None:
                made = make(row)
                token, result = by_key[made.row_key]
                if result is not None:
                    made = attrs.evolve(made, results={**made.results, stage: json.loads(result)})
                chained[token] = made
        return completed, chained

    async def complete_many(
        self,
        conn: AsyncConnection[Any],
        stage: str,
        is_group: bool,
        items: Sequence[Completion],
        *,
        worker_id: str = "manual",
        lease: float = DEFAULT_LEASE,
    ) -> tuple[set[int], dict[int, Claim]]:
        """Complete runs of one stage in one statement.

        Each item is ``(run_id, token, row_key, result_json, chain)``. When every item has
        ``chain``, the rows (or groups) go straight on to the next stage of their level,
        claimed for ``worker_id``; otherwise they land on done. Returns the tokens of the
        runs that were still ours, and the new claims by the token of the run they continue.
        """
        cur = conn.cursor()
        await cur.execute(*self._complete_params(stage, is_group, items, worker_id, lease))
        return self._read_completion(stage, items, cur.description, await cur.fetchall())

    def complete_many_sync(
        self,
        conn: Connection[Any],
        stage: str,
        is_group: bool,
        items: Sequence[Completion],
        *,
        worker_id: str = "manual",
        lease: float = DEFAULT_LEASE,
    ) -> tuple[set[int], dict[int, Claim]]:
        """:meth:`complete_many` on a blocking connection (a sync handler's own)."""
        cur = conn.cursor()
        cur.execute(*self._complete_params(stage, is_group, items, worker_id, lease))
        return self._read_completion(stage, items, cur.description, cur.fetchall())

    async def complete(self, conn: AsyncConnection[Any], claim: Claim, result: str | None) -> None:
        """Mark the claim's stage done in ``conn``'s transaction; raise if the lease was lost."""
        completed, _ = await self.complete_many(
            conn,
            claim.stage,
            claim.is_group,
            [(claim.run_id, claim.token, claim.row_key, result, False)],
        )
        if claim.token not in completed:
            raise LeaseLostError(claim.run_id)

    async def expire(
        self,
        conn: AsyncConnection[Any],
        claims: Sequence[Claim] = (),
        *,
        reason: str | None = None,
        free: bool = False,
        deep: bool = False,
    ) -> list[tuple[str, str, bool, bool]]:
        """Close ``claims`` (handed back) and every run whose lease ran out, and undo the
        claims of rows no run holds. Returns ``(stage, key, retrying, was unheld)`` for each.

        ``free`` retries the closed runs even when their attempts are used up (they were
        abandoned, not tried); otherwise the rule for dead workers applies (at least
        :data:`DEAD_WORKER_ATTEMPTS` attempts). ``deep`` also finds expired runs whose row
        was moved on by hand (not index-bounded).
        """
        stages = list(self.pipeline)
        cur = await conn.execute(
            self.text("expire_leases"),
            self.params(
                stages=[s.name for s in stages],
                afters=[s.after for s in stages],
                max_attempts=[max(s.retry.max_attempts, DEAD_WORKER_ATTEMPTS) for s in stages],
                is_group=[s.group for s in stages],
                run_ids=[c.run_id for c in claims],
                tokens=[c.token for c in claims],
                reason=reason,
                free=free,
                deep=deep,
            ),
        )
        return [
            (stage, key, retrying, unheld)
            for stage, key, retrying, unheld, _ in await cur.fetchall()
        ]

    async def fail(
        self,
        conn: AsyncConnection[Any],
        claim: Claim,
        error: str,
        *,
        retry_in: float | None,
        cancelled: bool = False,
    ) -> bool:
        """Close the run as failed; with ``retry_in`` keep the row and schedule the next attempt.

        Returns False when the run was no longer ours (lease lost).
        """
        name = "fail_group" if claim.is_group else "fail_row"
        cur = await conn.execute(
            self.text(name),
            self.params(
                stage=claim.stage,
                run_id=claim.run_id,
                token=claim.token,
                error=error,
                retry_in=retry_in,
                state="cancelled" if cancelled else "failed",
            ),
        )
        return await cur.fetchone() is not None


_claimers: weakref.WeakKeyDictionary[Pipeline, Claimer] = weakref.WeakKeyDictionary()


async def claimer_for(conn: AsyncConnection[Any], pipeline: Pipeline) -> Claimer:
    """The pipeline's :class:`Claimer`, built on first use from the catalog."""
    found = _claimers.get(pipeline)
    if found is None:
        found = Claimer(pipeline, await statements_for(conn, pipeline))
        found.limits = await read_limits(conn, pipeline)
        _claimers[pipeline] = found
    return found


def cached_claimer(pipeline: Pipeline) -> Claimer | None:
    """The pipeline's :class:`Claimer` if :func:`claimer_for` built it already."""
    return _claimers.get(pipeline)
