"""arq, behind one module: the control-plane jobs of ``batchd.batches`` as arq functions, and the
scheduler that enqueues them. Nothing else in batchd imports arq, so the job runner could be swapped.

Jobs are enqueued under deterministic ids (``submit:<fid>``, ``fanout:<batch>``): arq refuses a second job
with an id that is queued, deferred or running, which makes re-enqueueing (by the reconciler, or the poller
each tick) a no-op.
Jobs are serialised as JSON, not pickle.

arq spells its own keys with a fixed ``arq:`` prefix (job, in-progress, retry, result and abort keys), so two
deployments on one Redis would share them (and every deployment's cron job ids). ``connect`` returns an
ArqRedis whose commands carry those keys under the deployment's ``{prefix}:arq:`` instead: every key arq
writes then belongs to its deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry, Worker, func
from redis.asyncio.client import Pipeline

from . import batches
from .batches import Context, RetryLater
from .leases import LEASE_S
from .store import Keys, connection_pool

__all__ = ["ArqScheduler", "JobLeases", "JobWorker", "abandon_worker", "build_worker", "connect"]

# Generous: a run of each is short, but a job retries (RetryLater) for as long as the batch is open.
_MANY_TRIES = 1_000_000


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=str).encode()


def _loads(data: bytes) -> Any:
    return json.loads(data)


_ARQ_PREFIX = "arq:"


def _namespaced(namespace: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Only arq's own key names start with "arq:": job ids, function names and (bytes) job data never do.
    return tuple(
        namespace + a[len(_ARQ_PREFIX) :] if isinstance(a, str) and a.startswith(_ARQ_PREFIX) else a
        for a in args
    )


class _NamespacedPipeline(Pipeline):
    namespace = _ARQ_PREFIX

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return super().execute_command(*_namespaced(self.namespace, args), **kwargs)

    async def reset(self) -> None:
        try:
            await super().reset()  # type: ignore[no-untyped-call]
        finally:
            # Cancelled mid-UNWATCH (a worker stopping inside one of arq's WATCH transactions): the connection
            # may still be WATCHing, so it must not go back to the pool. It stays counted as in use until the
            # pool closes (which disconnects it); dropping our reference keeps the pipeline from being
            # collected while it holds a connection (an "Unclosed client session" warning).
            self.connection = None


class _NamespacedArqRedis(ArqRedis):
    """ArqRedis with arq's ``arq:`` keys moved under one deployment's namespace (plain commands and
    pipelines, including the WATCH/MULTI transactions arq uses to claim and finish jobs)."""

    namespace = _ARQ_PREFIX

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await super().execute_command(  # type: ignore[no-untyped-call]
            *_namespaced(self.namespace, args), **options
        )

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        pipe = _NamespacedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.namespace = self.namespace
        return pipe


def connect(redis_url: str, keys: Keys) -> ArqRedis:
    """The Redis client arq runs on, for one deployment."""
    pool = _NamespacedArqRedis(
        connection_pool(redis_url, "jobs"),
        job_serializer=_dumps,
        job_deserializer=_loads,
        default_queue_name=keys.arq_queue,
    )
    pool.namespace = keys.arq_namespace
    return pool


class ArqScheduler:
    """batches.Scheduler on arq. ``wake`` (set by the daemon) tells this process's worker a job is waiting."""

    def __init__(self, pool: ArqRedis, queue_name: str) -> None:
        self.pool = pool
        self.queue_name = queue_name
        self.wake: Callable[[], None] = lambda: None

    async def submit(self, fid: str) -> None:
        await self.pool.enqueue_job("submit_flush", fid, _job_id=f"submit:{fid}", _queue_name=self.queue_name)
        self.wake()

    async def fanout(self, batch_id: str) -> bool:
        job = await self.pool.enqueue_job(
            "fanout_results", batch_id, _job_id=f"fanout:{batch_id}", _queue_name=self.queue_name
        )
        self.wake()
        return job is not None


# The worker looks at its queue every _BUSY_POLL_S while jobs are about (one runs, or one ran within
# _BUSY_FOR_S); otherwise it sleeps until this process enqueues a job (wake) or _IDLE_POLL_S passes (a job
# enqueued by another replica, a retry falling due). Each look is a Redis command and a loop wake-up: an
# idle daemon polling every 50 ms made 20 of its ~47 Redis commands a second.
_BUSY_POLL_S = 0.05
_IDLE_POLL_S = 1.0
# Covers the short retries a job asks for (RetryLater of a fraction of a second to a second or two).
_BUSY_FOR_S = 3.0


class JobWorker(Worker):
    """arq's Worker, looking at its queue at full speed only while jobs are about (see _IDLE_POLL_S)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._woken = asyncio.Event()
        self._busy_until = 0.0
        self.job_runs = 0  # jobs started: the heartbeat's JobLeases writes only when this moved

    def wake(self) -> None:
        """A job was enqueued by this process: look at the queue now."""
        self._woken.set()

    async def _poll_iteration(self) -> None:
        if not self.tasks and time.monotonic() >= self._busy_until:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), _IDLE_POLL_S)
        self._woken.clear()
        await super()._poll_iteration()
        if self.tasks:
            self._busy_until = time.monotonic() + _BUSY_FOR_S

    async def run_job(self, job_id: str, score: int) -> None:
        self.job_runs += 1
        await super().run_job(job_id, score)


def _context(ctx: dict[str, Any]) -> Context:
    context: Context = ctx["batchd"]
    return context


async def _registered(ctx: dict[str, Any]) -> Context:
    """The job's Context, once the job is noted as running on this replica: a restart under the same name
    frees it at once (the heartbeat keeps the note current; this covers the second before its next beat)."""
    context = _context(ctx)
    await context.store.note_running_job(context.replica, str(ctx["job_id"]), ms=int(LEASE_S * 1000))
    return context


async def _submit_flush(ctx: dict[str, Any], fid: str) -> str:
    try:
        return await batches.submit_flush(await _registered(ctx), fid)
    except RetryLater as exc:
        raise Retry(defer=exc.defer) from exc


async def _fanout_results(ctx: dict[str, Any], batch_id: str) -> str:
    try:
        return await batches.fanout_results(await _registered(ctx), batch_id)
    except RetryLater as exc:
        raise Retry(defer=exc.defer) from exc


def build_worker(
    context: Context,
    pool: ArqRedis,
    *,
    queue_name: str,
    max_jobs: int = 10,
    job_timeout: float = 900.0,
    lease_s: float = 15.0,
) -> JobWorker:
    """An arq Worker for the batch jobs. Signals are the daemon's business, not arq's."""
    functions = [
        func(_submit_flush, name="submit_flush", max_tries=_MANY_TRIES, keep_result=0, timeout=job_timeout),
        func(
            _fanout_results, name="fanout_results", max_tries=_MANY_TRIES, keep_result=0, timeout=job_timeout
        ),
    ]
    worker = JobWorker(
        functions,
        redis_pool=pool,
        queue_name=queue_name,
        handle_signals=False,
        max_jobs=max_jobs,
        poll_delay=_BUSY_POLL_S,
        keep_result=0,
        ctx={"batchd": context},
        job_serializer=_dumps,
        job_deserializer=_loads,
        log_results=False,
    )
    # arq marks a job running with an in-progress key that lives for the longest job timeout (+10 s), so a
    # job whose replica dies, or whose finish a Redis outage swallowed, would wait that long to run again.
    # Make it a lease instead: short, renewed every heartbeat while the job really runs (JobLeases).
    worker.in_progress_timeout_s = lease_s
    return worker


class JobLeases:
    """Renews, on the heartbeat, the in-progress lease of every job a worker runs, and keeps their ids noted
    under the replica's name (so a restart under that name frees them at once: release_leftovers). Writes
    nothing while no job runs, none started since the last renewal and nothing is noted: an idle replica's
    heartbeat costs no command here."""

    def __init__(self, pool: ArqRedis, keys: Keys, replica: str, *, lease_s: float) -> None:
        self._pool = pool
        self._registry = keys.replica_jobs(replica)
        self._ms = int(lease_s * 1000)
        self._noted = False
        self._runs = 0

    async def renew(self, worker: JobWorker) -> None:
        running = [job_id for job_id, task in worker.tasks.items() if not task.done()]
        # A job started since the last renewal noted itself (_registered), even if it has ended since.
        if not running and not self._noted and worker.job_runs == self._runs:
            return
        runs = worker.job_runs
        async with self._pool.pipeline(transaction=True) as pipe:
            for job_id in running:
                pipe.pexpire(in_progress_key_prefix + job_id, self._ms)
            pipe.delete(self._registry)
            if running:
                pipe.sadd(self._registry, *running)
                pipe.pexpire(self._registry, self._ms)
            await pipe.execute()
        self._noted, self._runs = bool(running), runs


async def release_leftovers(pool: ArqRedis, job_ids: list[str]) -> None:
    """Free the in-progress leases of jobs that are known not to run any more (a restart under the same
    replica name), so any replica runs them now."""
    if job_ids:
        await pool.delete(*(in_progress_key_prefix + job_id for job_id in job_ids))


async def abandon_worker(worker: Worker, pool: ArqRedis) -> None:
    """Stop what a dead worker was still running and free the in-progress keys of the jobs it did not
    finish, so the next worker runs them now rather than when their lease lapses."""
    tasks = dict(worker.tasks)
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    unfinished = [job_id for job_id, t in tasks.items() if t.cancelled() or t.exception() is not None]
    if unfinished:
        await pool.delete(*(in_progress_key_prefix + job_id for job_id in unfinished))
    worker.tasks.clear()
