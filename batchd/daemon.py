"""``batchd run``: one replica of the daemon.

It runs its loops under one supervisor (each restarted with backoff if it fails, e.g. while Redis is down):
the accumulator (intake -> flushes), the arq worker (submit and fan-out jobs), the poller (on the one replica
holding its lease: every open batch, by list, each tick), the real-time sender, the reconciler and a
heartbeat (replica liveness, leases, the metrics-leader lease, the systemd watchdog). The queue gauges are
read when /metrics is scraped. Stopping
(SIGTERM, SIGINT or ``stop``) stops taking work, lets running jobs finish within the grace period, and
exits 0. Anything in flight at a SIGKILL is recovered by the other replicas or the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import jobs, metrics, replica, systemd
from .accumulator import Accumulator
from .apiclient import RATE_WINDOW_S, api_client
from .apihealth import api_health
from .batches import Context, RealtimeSender, poll_open_batches, reconcile
from .errors import ConfigError
from .health import Health
from .leases import LEASE_S
from .logs import log_event, register_secret
from .ops import start_ops_server
from .settings import Settings, redact_url
from .store import Keys, QueueSnapshot, SchemaMismatch, Store, Trigger, connect, now_ms
from .version import __version__

__all__ = ["Daemon"]

log = logging.getLogger(__name__)

# Every lease (LEASE_S, 15 s) is renewed about 7 times before it lapses, and a replica's beat is at most this
# old while it lives, well inside DEAD_AFTER_S. Each beat is one script call (beat.lua) plus what is held.
_HEARTBEAT_S = 2.0
# A replica whose heartbeat is older than this is stopped: its queued entries are claimed by the others.
DEAD_AFTER_S = 10.0
_METRICS_LEASE_MS = int(3 * _HEARTBEAT_S * 1000)
# A safety net, on every replica (one pass per interval across them all: take_reconcile_turn).
_RECONCILE_S = 5.0
# /metrics reads the queue gauges from Redis at most this often, however many scrapers ask.
_GAUGES_FRESH_S = 1.0
# /readyz checks that cost something (an API call) run at most this often; so does the policy re-check.
_SLOW_CHECK_S = 30.0
_SAFE_POLICIES = frozenset({"noeviction"})
_STATUS_EVERY_S = 10.0


class Daemon:
    def __init__(self, settings: Settings, *, consumer: str | None = None) -> None:
        if settings.anthropic_api_key is None:
            raise ConfigError("BATCHD_ANTHROPIC_API_KEY (or ANTHROPIC_API_KEY) is not set")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.consumer = consumer or settings.replica_name or replica.default_name()
        self._token = replica.new_token()
        self.health = Health()
        self.stop_event = asyncio.Event()
        self.metrics_port: int | None = None
        self.front_url: str | None = None  # when this replica also serves the front (BATCHD_HTTP_PORT)
        self._front = contextlib.AsyncExitStack()
        self._ready = asyncio.Event()
        self._serving = asyncio.Event()
        self._metrics_leader = False
        self._gauges_read = 0.0
        register_secret(settings.anthropic_api_key.get_secret_value())
        self.redis = connect(settings.redis_url, "daemon")
        self.store = Store(self.redis, self.keys)
        # Every batch-endpoint call takes a slot of the requests-per-minute budget all replicas share.
        self.api = api_client(settings, self.store.scripts)

    def __repr__(self) -> str:
        return f"Daemon(consumer={self.consumer!r}, redis={redact_url(self.settings.redis_url)!r})"

    async def wait_ready(self) -> None:
        """Until the replica takes work (its start-up checks passed)."""
        await self._ready.wait()

    async def wait_serving(self) -> None:
        """Until /healthz, /readyz and /metrics answer (start-up may still be waiting for Redis)."""
        await self._serving.wait()

    def stop(self) -> None:
        self.stop_event.set()

    async def run(self, *, install_signal_handlers: bool = True) -> int:
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        s = self.settings
        log_event(
            log,
            "daemon.starting",
            consumer=self.consumer,
            redis=redact_url(s.redis_url),
            api=s.anthropic_base_url or "https://api.anthropic.com",
        )
        server = await start_ops_server(
            s.metrics_host, s.metrics_port, self.health, before_scrape=self._refresh_gauges
        )
        self.metrics_port = server.port
        self._serving.set()
        self.health.add_check("redis", self.redis.ping)
        self.health.add_check("redis_policy", self._policy_ok, cache_seconds=_SLOW_CHECK_S)
        # An authenticated API call: cached, so a probe every second does not cost a call every second.
        self.health.add_check("anthropic", self._check_api, cache_seconds=_SLOW_CHECK_S)
        metrics.BUILD_INFO.info({"version": __version__})
        arq_pool = jobs.connect(s.redis_url, self.keys)
        try:
            await self._when_reachable(self._check_schema)
            await self._when_reachable(self._check_policy)
            await self._when_reachable(self._claim_name)
            await self._when_reachable(lambda: self._take_back_leftovers(arq_pool))
            if s.http_port is not None:
                # The front in this process too (`batchd front` runs it alone); a bad token file stops start.
                from .front import front_from_settings

                self.front_url = (await self._front.enter_async_context(front_from_settings(s))).url
        except BaseException:
            await server.close()
            await arq_pool.aclose(close_connection_pool=True)
            await self.redis.aclose(close_connection_pool=True)
            await self.api.close()
            raise
        scheduler = jobs.ArqScheduler(arq_pool, self.keys.arq_queue)
        context = Context(self.store, s, self.api, scheduler, replica=self.consumer)

        async def on_flush(fid: str, trigger: Trigger, n: int, nbytes: int) -> None:
            await scheduler.submit(fid)

        accumulator = Accumulator(
            self.store,
            consumer=self.consumer,
            max_requests=s.max_batch_requests,
            max_bytes=s.max_batch_bytes,
            max_age_s=s.max_batch_age_seconds,
            on_flush=on_flush,
            on_read=metrics.REQUESTS_SUBMITTED.inc,
            beat=lambda: self.health.beat("accumulator"),
            dead_after_s=DEAD_AFTER_S,
            held=self._held_by_queue_cap,
            grouping=s.cache_grouping,
            priming=s.cache_priming,
            prime_min_requests=s.cache_prime_min_requests,
            prime_wait_s=s.cache_prime_wait_seconds,
        )
        self.health.register("accumulator", max_silence=30.0)
        self.health.register("poller", max_silence=max(30.0, 3 * self._poll_every()))
        self.health.register("heartbeat", max_silence=30.0)
        self.health.register("realtime", max_silence=30.0)
        self.health.register("reconciler", max_silence=max(30.0, 3 * _RECONCILE_S))
        job_leases = jobs.JobLeases(arq_pool, self.keys, self.consumer, lease_s=LEASE_S)
        sender = RealtimeSender(context, beat=lambda: self.health.beat("realtime"))
        worker_box: list[Any] = []

        async def run_worker() -> None:
            if worker_box:
                # The last worker's loop died (Redis went away): its jobs must not stay "in progress".
                await jobs.abandon_worker(worker_box[0], arq_pool)
                worker_box.clear()
            worker = jobs.build_worker(
                context,
                arq_pool,
                queue_name=self.keys.arq_queue,
                job_timeout=s.job_timeout_seconds,
                lease_s=LEASE_S,
            )
            worker_box[:] = [worker]
            scheduler.wake = worker.wake  # a job enqueued here runs at once, however idle the worker was
            await worker.async_run()

        tasks = [
            asyncio.create_task(self._supervise("accumulator", lambda: accumulator.run(self.stop_event))),
            asyncio.create_task(
                self._supervise("heartbeat", lambda: self._heartbeat(context, job_leases, worker_box))
            ),
            asyncio.create_task(self._supervise("worker", run_worker)),
            asyncio.create_task(self._supervise("poller", lambda: self._poll(context))),
            asyncio.create_task(self._supervise("realtime", lambda: sender.run(self.stop_event))),
            asyncio.create_task(self._supervise("reconciler", lambda: self._reconcile(context))),
        ]
        self._ready.set()
        systemd.ready()
        systemd.status(f"replica {self.consumer}: running")
        log_event(
            log, "daemon.ready", consumer=self.consumer, metrics_port=server.port, front=self.front_url or ""
        )
        try:
            await self.stop_event.wait()
        finally:
            systemd.stopping()
            log_event(log, "daemon.stopping", grace_seconds=s.shutdown_grace_seconds)
            # No new callers; the held ones are cut and, with their request ids, collect later.
            with contextlib.suppress(Exception):
                await self._front.aclose()
            await self._shutdown(tasks, worker_box[0] if worker_box else None, sender, context, job_leases)
            with contextlib.suppress(Exception):
                # Gone from the heartbeat set: the other replicas claim this one's queued entries at once.
                await self.store.forget_replica(self.consumer)
                await self.store.release_replica(self.consumer, self._token)
                # The next replica polls at once rather than when the lease lapses.
                await self.store.release_lock(self.keys.poller_lease, self.consumer)
            with contextlib.suppress(Exception):
                await arq_pool.aclose(close_connection_pool=True)
            await self.redis.aclose(close_connection_pool=True)
            await self.api.close()
            await server.close()
            log_event(log, "daemon.stopped", consumer=self.consumer)
        return 0

    async def _when_reachable(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run a start-up step, waiting (stoppably) for Redis if it is not up yet."""
        backoff = 0.2
        while not self.stop_event.is_set():
            try:
                await step()
                return
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                log.warning("Redis unreachable at start (%s); retrying in %.1fs", exc, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def _check_schema(self) -> None:
        """Refuse another batchd version's data."""
        try:
            await self.store.check_schema()
        except SchemaMismatch as exc:
            raise ConfigError(f"BATCHD_KEY_PREFIX: {exc}") from None

    async def _check_policy(self) -> None:
        """Refuse an evicting Redis: it drops accepted work silently (an intake stream, a request record)."""
        policy = await self.store.maxmemory_policy()
        if policy in _SAFE_POLICIES:
            return
        if not self.settings.allow_evicting_redis:
            raise ConfigError(
                f"BATCHD_ALLOW_EVICTING_REDIS: Redis runs with maxmemory-policy {policy}, which can evict "
                "queued work and answers; set maxmemory-policy noeviction "
                "(or BATCHD_ALLOW_EVICTING_REDIS=true to run anyway)"
            )
        log.warning(
            "Redis runs with maxmemory-policy %s: queued work may be evicted (allowed by setting)", policy
        )

    async def _policy_ok(self) -> bool:
        policy = await self.store.maxmemory_policy()
        if policy not in _SAFE_POLICIES and not self.settings.allow_evicting_redis:
            raise ValueError(f"maxmemory-policy {policy} can evict queued work (set noeviction)")
        return True

    async def _claim_name(self) -> None:
        await replica.claim_name(
            self.store, self.consumer, self._token, give_up=lambda: self.stop_event.is_set()
        )

    async def _take_back_leftovers(self, arq_pool: Any) -> None:
        await replica.take_back_leftovers(self.store, self.consumer, arq_pool)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: stopping", sig.name)
        self.stop_event.set()

    async def _shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        worker: Any,
        sender: RealtimeSender,
        context: Context,
        job_leases: jobs.JobLeases,
    ) -> None:
        grace = self.settings.shutdown_grace_seconds
        # Real-time calls under way get the same grace as running jobs, side by side; the leases of both
        # are renewed meanwhile (the heartbeat has stopped), so no other replica takes over work still
        # running here.
        running_jobs = worker is not None and any(not t.done() for t in worker.tasks.values())
        renewing = None
        if running_jobs or sender.busy:
            drained = asyncio.Event()
            renewing = asyncio.create_task(self._renew_until(drained, context, job_leases, worker))
        try:
            await asyncio.gather(self._drain_jobs(worker, grace), sender.drain(grace))
        finally:
            if renewing is not None:
                # Told to stop and cancelled: it ends at its next step either way (a cancellation that
                # lands inside a Redis call can be lost there), and is never waited for long.
                drained.set()
                renewing.cancel()
                await asyncio.wait({renewing}, timeout=5.0)
        await _cancel_all(tasks, deadline=5.0)

    async def _renew_until(
        self, done: asyncio.Event, context: Context, job_leases: jobs.JobLeases, worker: Any
    ) -> None:
        while not done.is_set():
            with contextlib.suppress(Exception):
                await context.leases.renew()
                if worker is not None:
                    await job_leases.renew(worker)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), _HEARTBEAT_S)

    async def _drain_jobs(self, worker: Any, grace: float) -> None:
        if worker is not None:
            # Stop picking jobs; let the running ones finish within the grace period, then cancel them
            # (arq puts a cancelled job back in the queue: another replica or the next start runs it).
            worker.allow_pick_jobs = False
            running = [t for t in worker.tasks.values() if not t.done()]
            if running:
                _done, late = await asyncio.wait(running, timeout=grace)
                if late:
                    log.warning(
                        "%d jobs still running after %.0fs; cancelling (they re-run later)", len(late), grace
                    )
                    await _cancel_all(list(late), deadline=5.0)

    async def _supervise(self, name: str, make: Callable[[], Awaitable[None]]) -> None:
        """Run a loop until stop; when it fails, say why and restart it with backoff."""
        backoff = 0.2
        lost_redis = False
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                if lost_redis:
                    await self.redis.ping()
                    log.info("%s: Redis reachable again; resuming", name)
                    lost_redis = False
                await make()
                if self.stop_event.is_set():
                    return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if _lost_redis(exc):
                    lost_redis = True
                    log.warning("%s: Redis unreachable (%s); reconnecting in %.1fs", name, exc, backoff)
                else:
                    log.exception("%s failed; restarting in %.1fs", name, backoff)
            if time.monotonic() - started > 30:
                backoff = 0.2
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), backoff)
            backoff = min(backoff * 2, 10.0)

    async def _heartbeat(self, context: Context, job_leases: jobs.JobLeases, worker_box: list[Any]) -> None:
        watchdog = systemd.watchdog_interval()
        last_ping = last_status = 0.0
        while not self.stop_event.is_set():
            beat = await self.store.scripts.beat(
                self.consumer,
                self._token,
                now_ms=now_ms(),
                name_ms=int(LEASE_S * 1000),
                metrics_ms=_METRICS_LEASE_MS,
            )
            if not beat.owner:
                log.error("replica %s: another process took this replica's name; stopping", self.consumer)
                self.stop_event.set()
                return
            await context.leases.renew()
            api = api_health.alarm()
            if time.monotonic() - last_status >= _STATUS_EVERY_S:
                last_status = time.monotonic()
                await self.store.note_replica_status(
                    self.consumer,
                    api_healthy=api.healthy,
                    api_failing_s=api.failing_for_s,
                    api_error=api.last_error,
                    ms=int(_STATUS_EVERY_S * 3 * 1000),
                )
                await self._recheck_policy()
            if worker_box:
                await job_leases.renew(worker_box[0])
            if self._metrics_leader and not beat.leader:
                metrics.queue_gauges.clear()
            self._metrics_leader = beat.leader
            self.health.beat("heartbeat")
            if watchdog and time.monotonic() - last_ping >= watchdog / 2 and self.health.all_alive():
                systemd.watchdog()
                last_ping = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), _HEARTBEAT_S)

    async def _refresh_gauges(self) -> None:
        """Before a scrape: the queue gauges, read now, on the metrics leader only (the others export none,
        so a sum over replicas counts the queue once). Reading them on each heartbeat instead cost an idle
        daemon ~9 Redis commands a second whether anyone scraped or not."""
        if not self._metrics_leader:
            metrics.queue_gauges.clear()
            return
        if time.monotonic() - self._gauges_read < _GAUGES_FRESH_S:
            return
        try:
            snapshot = await self.snapshot()
        except Exception as exc:  # Redis unreachable: no gauge rather than a stale one
            log.warning("queue gauges not read (%s)", exc)
            metrics.queue_gauges.clear()
            return
        self._gauges_read = time.monotonic()
        metrics.queue_gauges.update(snapshot)

    async def _reconcile(self, context: Context) -> None:
        """The reconciler's loop (batches.reconcile): heals what a crash between two steps left behind."""
        while not self.stop_event.is_set():
            await reconcile(context)
            self.health.beat("reconciler")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), _RECONCILE_S)

    def _poll_every(self) -> float:
        """The poll tick: poll_interval_seconds, but never more than a quarter of the API's requests per
        minute (at tier 1, 45 calls a minute: a tick every 5.3 s), so creates and downloads keep the rest."""
        return max(self.settings.poll_interval_seconds, RATE_WINDOW_S / (self.settings.effective_api_rpm / 4))

    async def _poll(self, context: Context) -> None:
        """Every tick, on the replica that holds the poller lease: look at every open batch (a list call per
        thousand). Any replica takes the lease over within LEASE_S of its holder stopping."""
        every = self._poll_every()
        while not self.stop_event.is_set():
            started = time.monotonic()
            if await self.store.take_poller_lease(self.consumer, ms=int(max(LEASE_S, 3 * every) * 1000)):
                await poll_open_batches(context)
            self.health.beat("poller")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), max(0.0, every - (time.monotonic() - started)))

    async def _held_by_queue_cap(self) -> bool:
        return await self.store.held_by_queue_cap_since() is not None

    async def _recheck_policy(self) -> None:
        # maxmemory-policy can change at run time (CONFIG SET): an evicting one is an emergency.
        if self.settings.allow_evicting_redis:
            return
        policy = await self.store.maxmemory_policy()
        if policy not in _SAFE_POLICIES:
            log.error(
                "Redis now runs with maxmemory-policy %s: queued work can be evicted; set noeviction", policy
            )

    async def snapshot(self) -> QueueSnapshot:
        return await self.store.snapshot(dead_after_ms=int(DEAD_AFTER_S * 1000))

    async def _check_api(self) -> bool:
        await self.api.messages.batches.list(limit=1)
        return True


def _lost_redis(exc: BaseException) -> bool:
    """A lost connection to Redis, however redis-py wraps it (a WatchError raised because the connection
    under a WATCH broke, for one)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, RedisConnectionError | RedisTimeoutError | OSError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


async def _cancel_all(tasks: list[asyncio.Task[Any]], *, deadline: float) -> None:
    """Cancel and wait, cancelling again while any is left: redis-py can swallow a cancellation that lands
    in its zero-timeout readiness check (redis/redis-py#4063), and arq's loop would then run on for ever."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + deadline
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=0.5)
        if pending and loop.time() > stop_at:
            log.error("%d tasks did not stop within %.0fs of being cancelled", len(pending), deadline)
            return
