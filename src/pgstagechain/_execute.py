"""Running a claimed run: the handler's context and connection, its time-out, sync or
async, its result as JSON, and then completion, or failure by the stage's retry policy.

A row that can go straight on to its next stage on this worker does so in the same
task: the completion claims the next stage in the same statement, and the executor runs
that one too.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import attrs
from anyio.abc import TaskGroup
from psycopg import AsyncConnection, Connection, pq

from ._batcher import CompletionBatcher
from ._claim import Claimer, to_json
from ._context import Claim, StageContext, run_fields
from ._hints import Hints
from ._links import DB_ERRORS, BlockingLoan, HandlerConnections, Link, connection_lost
from ._runs import LiveRuns, WorkerStats
from ._stage import Stage
from .errors import LeaseLostError, PermanentError

logger = logging.getLogger("pgstagechain.worker")

#: the longest error text kept in the ledger (its end: where the exception was raised)
MAX_ERROR_TEXT = 4000
#: tries of recording a failure before the run is left to its lease
FAIL_ATTEMPTS = 3
#: how a stage run can end, as reported to :meth:`RunObserver.observe_run`
OUTCOMES = ("succeeded", "failed", "retried", "lease_lost", "abandoned")


class RunObserver(Protocol):
    """What a worker calls around each stage run (see :class:`pgstagechain.metrics.Metrics`)."""

    def span(self, stage: str, claim: Claim) -> contextlib.AbstractContextManager[Any]: ...

    def observe_run(self, stage: str, outcome: str, seconds: float) -> None: ...


@attrs.frozen
class Failure:
    """What a failed attempt leaves: the error text, and when to try again (None: never)."""

    error: str
    retry_in: float | None


def failure_of(stage: Stage, claim: Claim, exc: BaseException) -> Failure:
    """The stage's retry policy applied to ``exc`` raised by ``claim``'s attempt."""
    if isinstance(exc, TimeoutError):
        error = f"TimeoutError: stage {stage.name!r} ran longer than {stage.timeout}s"
    else:
        error = "".join(traceback.format_exception(exc))[-MAX_ERROR_TEXT:]
    retry_in: float | None = None
    if not isinstance(exc, PermanentError) and claim.attempt < stage.retry.max_attempts:
        retry_in = stage.retry.delay(claim.attempt, random.random())
    return Failure(error, retry_in)


#: what a sync run that did not commit its own completion brings back from its thread
NONE: tuple[set[int], dict[int, Claim]] = (set(), {})


def wrote(conn: AsyncConnection[Any] | Connection[Any]) -> bool:
    """The handler's connection is in a transaction: it wrote (or read), and its
    completion must commit in that transaction."""
    return conn.info.transaction_status != pq.TransactionStatus.IDLE


async def call_handler(stage: Stage, ctx: StageContext[Any]) -> Any:
    """Run an async stage's handler within the stage's time-out (a stage without one
    costs no cancel scope)."""
    if stage.timeout is None:
        return await stage.run(ctx)
    with anyio.fail_after(stage.timeout):
        return await stage.run(ctx)


class RunExecutor:
    """Runs claims on a worker; see the module docstring."""

    def __init__(
        self,
        *,
        claimer: Claimer,
        runs: LiveRuns,
        hints: Hints,
        batcher: CompletionBatcher,
        finisher: Link,
        connections: HandlerConnections,
        threads: anyio.CapacityLimiter,
        tasks: TaskGroup,
        stats: WorkerStats,
        worker_id: str,
        lease: float,
        stopping: Callable[[], bool],
        observer: RunObserver | None = None,
    ) -> None:
        self.claimer = claimer
        self.runs = runs
        self.hints = hints
        self.batcher = batcher
        self.finisher = finisher
        self.connections = connections
        self.threads = threads
        self.tasks = tasks
        self.stats = stats
        self.worker_id = worker_id
        self.lease = lease
        self.stopping = stopping
        self.observer = observer

    async def execute(self, stage: Stage, claim: Claim) -> None:
        """Run ``claim`` and every run it goes straight on to; one cancel scope serves the
        whole chain: it cancels whichever run is current."""
        scope = self.runs.scope(claim)
        current: tuple[Stage, Claim] | None = (stage, claim)
        try:
            with scope:
                while current is not None:
                    stage, claim = current
                    current = await self._run_one(stage, claim)
            if scope.cancelled_caught:
                # Shut down past the deadline, or the lease was found lost: hand it back.
                with anyio.CancelScope(shield=True):
                    await self.release([claim], "worker stopped before the run finished")
        finally:
            self.runs.finish(stage.name, claim)

    async def release(self, claims: list[Claim], reason: str, *, free: bool = True) -> None:
        """Close runs we give up on so another worker retries them now, not at lease expiry.

        ``free`` retries even when the stage's attempts are used up (the run was abandoned,
        not tried); otherwise the rule for dead workers applies.
        """
        try:
            conn = await self.finisher.get()
            await self.claimer.expire(conn, claims, reason=reason, free=free)
        except DB_ERRORS as exc:
            logger.warning(
                "could not release %d run(s) (%s); their leases will expire", len(claims), exc
            )

    async def _run_one(self, stage: Stage, claim: Claim) -> tuple[Stage, Claim] | None:
        following: tuple[Stage, Claim] | None = None
        observer = self.observer
        started = time.monotonic() if observer is not None else 0.0
        outcome = "abandoned"
        span = observer.span(stage.name, claim) if observer else contextlib.nullcontext()
        try:
            with span:
                try:
                    if stage.is_async:
                        following = await self._run_async(stage, claim)
                    else:
                        following = await self._run_sync(stage, claim)
                    self.stats.succeeded += 1
                    outcome = "succeeded"
                except LeaseLostError:
                    self.stats.lease_lost += 1
                    outcome = "lease_lost"
                    logger.warning(
                        "run %s of %s lost its lease; result discarded", claim.run_id, stage.name
                    )
                except Exception as exc:
                    outcome = await self._failed(stage, claim, exc)
        finally:
            if observer is not None:
                observer.observe_run(stage.name, outcome, time.monotonic() - started)
        if following is not None:
            # The slot passes from this stage to the next along with the row.
            self.runs.pass_on(stage.name, claim, following[1])
            self.stats.claimed += 1
            self.stats.chained += 1
        return following

    # -- completion ---------------------------------------------------------------------

    def _book_next(self, stage: Stage) -> Stage | None:
        """Book a slot of the next stage if this row can go straight on to it here."""
        following = self.claimer.chain_target(stage.name)
        if following is None or self.stopping() or not self.runs.book(following.name):
            return None
        return following

    def _settle(
        self, booked: Stage | None, completed: bool, chained: Claim | None, claim: Claim
    ) -> tuple[Stage, Claim] | None:
        """Give back a booked slot the row did not take; raise if the claim was lost."""
        if booked is not None and chained is None:
            self.runs.unbook(booked.name)
        if not completed:
            raise LeaseLostError(claim.run_id)
        return (booked, chained) if booked is not None and chained is not None else None

    async def _complete_batched(
        self, stage: Stage, claim: Claim, payload: str | None
    ) -> tuple[Stage, Claim] | None:
        booked = self._book_next(stage)
        try:
            completed, chained = await self.batcher.complete(
                stage, claim, payload, chain=booked is not None
            )
        except BaseException:
            self._settle(booked, True, None, claim)
            raise
        return self._settle(booked, completed, chained, claim)

    async def _run_async(self, stage: Stage, claim: Claim) -> tuple[Stage, Claim] | None:
        if not stage.connection:
            result = await call_handler(stage, self._context(claim, None))
            return await self._complete_batched(stage, claim, to_json(stage.name, result))
        loan = await self.connections.lend()
        try:
            result = await call_handler(stage, self._context(claim, None, loan.take))
            payload = to_json(stage.name, result)
            if loan.conn is not None and wrote(loan.conn):
                # The handler wrote: complete in its transaction, so both commit or neither.
                return await self._complete_own(stage, claim, loan.conn, payload)
        finally:
            await self.connections.give_back(loan)
        # It did not (or never took its connection): its slot is free before the batch goes.
        return await self._complete_batched(stage, claim, payload)

    async def _complete_own(
        self, stage: Stage, claim: Claim, conn: AsyncConnection[Any], payload: str | None
    ) -> tuple[Stage, Claim] | None:
        """Complete in the handler's own transaction (going straight on to the next stage
        when it can), and commit both."""
        booked = self._book_next(stage)
        self.runs.concluding.add(claim.token)
        try:
            completed, chained = await self.claimer.complete_many(
                conn,
                stage.name,
                stage.group,
                [(claim.run_id, claim.token, claim.row_key, payload, booked is not None)],
                worker_id=self.worker_id,
                lease=self.lease,
            )
            if claim.token in completed:
                await conn.commit()
        except BaseException:
            self._settle(booked, True, None, claim)
            raise
        finally:
            self.runs.concluding.discard(claim.token)
        return self._settle(booked, claim.token in completed, chained.get(claim.token), claim)

    async def _run_sync(self, stage: Stage, claim: Claim) -> tuple[Stage, Claim] | None:
        booked: Stage | None = None
        abandoned = False

        def book() -> bool:
            """In the event loop, for a completion the thread is about to send: book the
            next stage's slot (not for a thread the run no longer waits for)."""
            nonlocal booked
            if not abandoned:
                booked = self._book_next(stage)
            return booked is not None

        def call() -> tuple[bool, str | None, tuple[set[int], dict[int, Claim]]]:
            if not stage.connection:
                return False, to_json(stage.name, stage.run(self._context(claim, None))), NONE
            loan = BlockingLoan(self.connections)
            try:
                payload = to_json(stage.name, stage.run(self._context(claim, None, loan.take)))
                if loan.conn is None or not wrote(loan.conn):
                    return False, payload, NONE
                chain = anyio.from_thread.run_sync(book)
                # From here the run is concluding: a lease renewal must not take a run this
                # commit closes for one whose lease was lost. (A set's add and discard are
                # atomic; the event loop only reads it.)
                self.runs.concluding.add(claim.token)
                outcome = self.claimer.complete_many_sync(
                    loan.conn,
                    stage.name,
                    stage.group,
                    [(claim.run_id, claim.token, claim.row_key, payload, chain)],
                    worker_id=self.worker_id,
                    lease=self.lease,
                )
                if claim.token in outcome[0]:
                    loan.conn.commit()
                return True, None, outcome
            finally:
                loan.give_back()

        try:
            with anyio.fail_after(stage.timeout):
                committed, payload, (completed, chained) = await anyio.to_thread.run_sync(
                    call, abandon_on_cancel=True, limiter=self.threads
                )
        except BaseException:
            abandoned = True
            self._settle(booked, True, None, claim)
            raise
        finally:
            self.runs.concluding.discard(claim.token)
        if committed:
            return self._settle(booked, claim.token in completed, chained.get(claim.token), claim)
        return await self._complete_batched(stage, claim, payload)

    def _context(
        self, claim: Claim, conn: Any, lend: Callable[[], Any] | None = None
    ) -> StageContext[Any]:
        return StageContext(claim=claim, conn=conn, lend=lend, worker_id=self.worker_id)

    # -- failure ------------------------------------------------------------------------

    async def _failed(self, stage: Stage, claim: Claim, exc: Exception) -> str:
        """Handle a failed run; return the outcome: failed, retried, lease_lost or abandoned."""
        if connection_lost(exc):
            # The database went away under the handler (restart, failover, a cut
            # connection): like a crash, not the handler's fault. Retry now.
            logger.warning(
                "run %s of %s lost its database connection (%s); retrying",
                claim.run_id,
                stage.name,
                str(exc).strip() or type(exc).__name__,
            )
            await self.release([claim], f"connection lost: {exc}", free=False)
            self.hints.due(stage.name)
            return "retried"
        if isinstance(exc, TimeoutError):
            self.stats.timed_out += 1
        failure = failure_of(stage, claim, exc)
        logger.log(
            logging.WARNING if failure.retry_in is not None else logging.ERROR,
            "stage %s failed for %s (attempt %d)%s: %s",
            stage.name,
            claim.row_key,
            claim.attempt,
            f", retrying in {failure.retry_in:.2f}s" if failure.retry_in is not None else "",
            str(exc) or type(exc).__name__,
            extra=run_fields(claim),
        )
        for _ in range(FAIL_ATTEMPTS):
            try:
                ours = await self.claimer.fail(
                    await self.finisher.get(), claim, failure.error, retry_in=failure.retry_in
                )
                self.finisher.ok()
                break
            except DB_ERRORS as db_exc:
                self.stats.db_errors += 1
                await self.finisher.broke(db_exc)
        else:
            return "abandoned"  # the lease will run out and the scanner will re-drive the row
        if not ours:
            self.stats.lease_lost += 1
            return "lease_lost"
        if failure.retry_in is None:
            self.stats.failed += 1
            return "failed"
        self.stats.retried += 1
        self.tasks.start_soon(self._retry_later, stage.name, failure.retry_in)
        return "retried"

    async def _retry_later(self, stage: str, delay: float) -> None:
        await anyio.sleep(delay)
        self.hints.due(stage)
