"""The controller of gateway replicas: one detached actor in the Ray cluster that runs every
model for all of them (docs/replicas.md).

It is the one-machine manager's supervisor, unchanged, in a Ray actor: one placement lock,
one start per model, one eviction decision, one memory ledger. What it learns from the
replicas is their request counts, reported every SYNC_PERIOD (cluster/shared.py): summed
over the live replicas, they count as the model's own pending and in-flight requests. The
request path stays replica -> engine; a replica asks the controller only for a model it
does not see routing.

Stopping a model as unused (idle unload, eviction) takes one more step than on one
machine: the model is marked draining, and it goes only once every live replica has
applied a reply showing that mark (from then on it asks the controller instead of routing
to the model) and reported no request begun since. A request that raced the decision keeps
the model; none is sent to an engine that is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_manager.cluster.nodes import Cluster
from llm_manager.cluster.ray_backend import RayCluster
from llm_manager.cluster.remote import RemoteEngine
from llm_manager.cluster.shared import (
    LOG_LINES_PER_REPLY,
    ORPHAN_SECONDS,
    REPLICA_TTL,
    Answer,
    Counts,
    Failure,
    Kept,
    Line,
    ModelView,
    Report,
    SyncReply,
)
from llm_manager.config import LoadedConfig
from llm_manager.devices.cluster import ClusterProvider
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.errors import ManagerError
from llm_manager.logs import LogBook, LogSettings
from llm_manager.models.runtime import ModelRuntime, State, probe_session
from llm_manager.models.supervisor import Supervisor
from llm_manager.store.db import for_store
from llm_manager.store.footprints import FootprintStore
from llm_manager.store.logs import LogStore

log = logging.getLogger(__name__)

NAME = "llm-manager-controller"


@dataclass
class _Replica:
    label: str
    heard: float  # monotonic time of its latest report
    seen: int = 0
    counts: dict[str, Counts] = field(default_factory=dict)


class Replicas:
    """The live gateway replicas: their request counts and which reply each has applied.
    Also issues the reply stamps (one counter: a stamp orders every reply)."""

    def __init__(self) -> None:
        self._live: dict[str, _Replica] = {}
        # Those that said they leave. Ray does not keep an async actor's calls in order: a
        # report sent before the leave can run after it, and must not bring the replica back
        # (the last one's leave would then not stop the models).
        self._left: set[str] = set()
        self._stamp = 0
        self._heard = asyncio.Event()
        self.empty_since: float | None = time.monotonic()

    def stamp(self) -> int:
        self._stamp += 1
        return self._stamp

    def __len__(self) -> int:
        return len(self._live)

    def report(self, report: Report) -> set[str]:
        """Take a replica's report; the models it began requests for since its last one."""
        if report.replica in self._left:
            return set()
        entry = self._live.get(report.replica)
        if entry is None:
            entry = self._live[report.replica] = _Replica(report.label, time.monotonic())
            log.info("gateway replica %s joined", report.label)
        used = {
            name
            for name, counts in report.counts.items()
            if counts.requests > getattr(entry.counts.get(name), "requests", 0)
        }
        entry.heard = time.monotonic()
        entry.seen = max(entry.seen, report.seen)
        entry.counts = report.counts
        self.empty_since = None
        self._wake()
        return used

    def leave(self, replica: str) -> None:
        self._left.add(replica)
        entry = self._live.pop(replica, None)
        if entry is not None:
            log.info("gateway replica %s left", entry.label)
        self._after_removal()

    def expire(self, now: float) -> list[str]:
        """Forget the replicas silent for REPLICA_TTL (killed, or cut off): their labels."""
        gone = [rid for rid, r in self._live.items() if now - r.heard > REPLICA_TTL]
        labels = []
        for rid in gone:
            labels.append(self._live.pop(rid).label)
            log.warning(
                "gateway replica %s stopped reporting: its requests no longer count", labels[-1]
            )
        if gone:
            self._after_removal()
        return labels

    def _after_removal(self) -> None:
        if not self._live and self.empty_since is None:
            self.empty_since = time.monotonic()
        self._wake()

    def _wake(self) -> None:
        self._heard.set()
        self._heard = asyncio.Event()

    def totals(self) -> dict[str, tuple[int, int]]:
        """Per model, (pending, admitted) summed over the live replicas."""
        out: dict[str, tuple[int, int]] = {}
        for entry in self._live.values():
            for name, c in entry.counts.items():
                pending, admitted = out.get(name, (0, 0))
                out[name] = (pending + c.pending, admitted + c.admitted)
        return out

    async def all_seen(self, mark: int, timeout: float) -> None:
        """Return once every live replica has reported after applying a reply stamped
        ``mark`` or later (a replica that goes silent meanwhile expires and stops counting)."""
        deadline = time.monotonic() + timeout
        while any(r.seen < mark for r in self._live.values()):
            heard = self._heard
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(heard.wait(), left)


class SharedSupervisor(Supervisor):
    """The supervisor as the controller runs it: requests counted on the replicas, and a
    model stopped as unused only once no replica routes to it any more."""

    def __init__(self, *args: Any, replicas: Replicas, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replicas = replicas
        self.draining: dict[str, int] = {}  # model -> how many stops are being confirmed
        self._drained = asyncio.Event()

    @contextlib.asynccontextmanager
    async def quiesced(self, names: Sequence[str]) -> AsyncIterator[list[str]]:
        mark = self.replicas.stamp()  # any reply from now on shows the mark
        for name in names:
            self.draining[name] = self.draining.get(name, 0) + 1
        try:
            # Up to two reports per replica, or until the silent ones expire. From then on
            # no replica sends these models a request by itself: what is in flight now is
            # all there will be, and the caller's own condition (idle, swappable), checked
            # again with the counts now reported, says whether the model goes.
            await self.replicas.all_seen(mark, REPLICA_TTL + 1.0)
            going = []
            for name in names:
                runtime = self.registry.get(name)
                if runtime is None:
                    continue
                if runtime.admitted:
                    runtime.log.event("in flight on a gateway replica meanwhile: not stopped")
                    continue
                going.append(name)
            yield going
        finally:
            for name in names:
                left = self.draining.get(name, 1) - 1
                if left:
                    self.draining[name] = left
                else:
                    self.draining.pop(name, None)
            self._drained.set()
            self._drained = asyncio.Event()

    def ready(self, name: str) -> None:
        super().ready(name)
        runtime = self.registry.get(name)
        fit = self._fits.get(name)
        if runtime is None or fit is None:
            return
        proc, plan, port = runtime.process, runtime.started_with, runtime.port
        if isinstance(proc, RemoteEngine) and plan is not None and port and proc.node:
            kept = Kept(name, fit, plan, port, proc.node, runtime.spec.schemes[fit.scheme])
            self._spawn(proc.keep(kept), f"keep {name}")

    def adopt(self, engine: RemoteEngine, kept: Kept, pid: int, seq: int) -> bool:
        """An engine the controller's earlier run started (found on a detached host): taken
        back as running when its model still has that scheme, unchanged, and is stopped;
        False otherwise (the caller ends it)."""
        runtime = self.registry.get(kept.model)
        scheme = kept.fit.scheme
        if (
            runtime is None
            or runtime.state is not State.STOPPED
            or runtime.spec.schemes.get(scheme) != kept.scheme
        ):
            return False
        engine.attach(pid, seq, runtime.log.extend)
        self._book(runtime, kept.fit)
        runtime.adopt(engine, scheme, kept.launch, kept.port)
        return True

    async def until_drained(self, name: str) -> None:
        while name in self.draining:
            await self._drained.wait()

    def count_replicas(self, used: set[str]) -> None:
        totals = self.replicas.totals()
        for runtime in self.runtimes:
            pending, admitted = totals.get(runtime.name, (0, 0))
            runtime.count_elsewhere(pending, admitted, runtime.name in used)

    def view(self, runtime: ModelRuntime, now: float) -> ModelView:
        auth = runtime.engine_auth
        ends = runtime.turn_ends
        name = runtime.name
        return ModelView(
            state=runtime.state.value,
            draining=name in self.draining,
            host=runtime.host,
            port=runtime.port,
            auth=auth[1].decode() if auth is not None else None,
            scheme=runtime.scheme,
            node=runtime.node,
            pid=runtime.pid,
            failure_reason=runtime.failure_reason,
            stop_reason=runtime.stop_reason,
            stops=runtime.stops,
            start_count=runtime.start_count,
            crash_count=runtime.crash_count,
            node_losses=runtime.node_losses,
            last_start_seconds=runtime.last_start_seconds,
            turn_left=None if ends is None else ends - now,
            waiting_for=tuple(runtime.waiting_for),
            booked=self.booked(name),
            placed_on=self.placed_on(name),
            idle_seconds=runtime.idle_seconds(now),
            memory_now=self.footprints.current(name),
        )


class _Core:
    """Everything the controller runs, built on its first call (inside its event loop)."""

    def __init__(self, loaded: LoadedConfig, epoch: str, cluster: Cluster | None) -> None:
        self.loaded = loaded
        self.epoch = epoch
        self._given = cluster
        self.replicas = Replicas()
        self.tasks: list[asyncio.Task[None]] = []
        self.supervisor: SharedSupervisor | None = None
        self.closed = False

    async def boot(self) -> _Core:
        config = self.loaded.config
        assert config.cluster is not None  # a controller exists in cluster mode only
        server = config.server
        cluster: Cluster
        if self._given is not None:
            cluster = self._given
        else:
            cluster = await asyncio.to_thread(RayCluster.connect, config.cluster)
        monitor = DeviceMonitor([ClusterProvider(cluster)])
        server.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = for_store(config.store, server.data_dir)
        await asyncio.to_thread(self.db.open)
        self.logbook = LogBook(LogStore(self.db), LogSettings.of(server))
        self.http = probe_session()
        self.supervisor = SharedSupervisor(
            self.loaded,
            monitor,
            self.http,
            self.logbook,
            FootprintStore(self.db),
            cluster,
            replicas=self.replicas,
        )
        await self.logbook.load()
        if isinstance(cluster, RayCluster):
            cluster.keep_hosts(NAME, ORPHAN_SECONDS)
            await self._adopt(cluster)
        await self.supervisor.start()
        self.tasks.append(asyncio.create_task(self.logbook.retention_loop(), name="retention"))
        self.tasks.append(asyncio.create_task(self._watch(), name="replicas"))
        log.info("controller %s running %d model(s)", self.epoch[:8], len(self.supervisor.runtimes))
        return self

    async def _adopt(self, cluster: RayCluster) -> None:
        """A restarted controller: the engines its earlier run left on detached hosts."""
        for engine, kept, pid, seq in await asyncio.to_thread(cluster.kept_engines):
            if isinstance(kept, Kept) and self.sup.adopt(engine, kept, pid, seq):
                log.info("adopted %s's engine (pid %d on node %s)", kept.model, pid, kept.node)
            else:
                engine.discard()  # its model changed or is gone: nothing owns it any more

    @property
    def sup(self) -> SharedSupervisor:
        assert self.supervisor is not None
        return self.supervisor

    async def _watch(self) -> None:
        """Expire silent replicas; end everything once none has been left for a while."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self.replicas.expire(now):
                self.sup.count_replicas(set())
            empty = self.replicas.empty_since
            if empty is not None and now - empty > ORPHAN_SECONDS:
                log.warning("no gateway replica for %g s: stopping every model", ORPHAN_SECONDS)
                await self.close()
                _exit_actor()
                return

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for task in self.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        with contextlib.suppress(Exception):
            await self.sup.shutdown()
        await self.http.close()
        await asyncio.to_thread(self.db.close)

    def sync(self, report: Report) -> SyncReply:
        sup = self.sup
        sup.count_replicas(self.replicas.report(report))
        for name, keep in report.keep_alive.items():  # an Ollama request's, on that replica
            runtime = sup.registry.get(name)
            if runtime is not None and (keep is None or keep[1] == runtime.start_count):
                runtime.keep_alive = keep
        now = time.monotonic()
        stamp = self.replicas.stamp()
        models = {r.name: sup.view(r, now) for r in sup.runtimes}
        logs = {}
        for runtime in sup.runtimes:
            mark = report.log_marks.get(runtime.name, 0)
            if runtime.log.last_seq == mark:
                continue
            lines = runtime.log.lines_after(mark)[:LOG_LINES_PER_REPLY]
            logs[runtime.name] = [
                Line(x.seq, x.timestamp, x.stream, x.message, x.level) for x in lines
            ]
        return SyncReply(self.epoch, stamp, models, logs, len(self.replicas))

    def answer(self, runtime: ModelRuntime, stopped: bool = False) -> Answer:
        view = self.sup.view(runtime, time.monotonic())
        return Answer(self.epoch, self.replicas.stamp(), view, stopped=stopped)

    def failure(self, exc: ManagerError) -> Answer:
        return Answer(self.epoch, self.replicas.stamp(), None, Failure.of(exc))

    async def ensure(self, name: str) -> Answer:
        sup = self.sup
        try:
            runtime = sup.resolve(name)
            runtime.acquire()  # counts as pending: a drain in progress keeps the model
            try:
                while True:
                    await runtime.ensure_ready()
                    if name not in sup.draining:
                        break
                    await sup.until_drained(name)
            finally:
                runtime.release()
        except ManagerError as exc:
            return self.failure(exc)
        return self.answer(runtime)

    async def stop(self, name: str, reason: str) -> Answer:
        try:
            runtime = self.sup.resolve(name)
        except ManagerError as exc:
            return self.failure(exc)
        stopped = await runtime.stop(reason)
        return self.answer(runtime, stopped)


def _exit_actor() -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


class Controller:
    """The Ray actor (detached, named NAME in the cluster's namespace); every method is
    a coroutine on its event loop, as every method of the supervisor must be."""

    def __init__(self, loaded: LoadedConfig, cluster: Cluster | None = None) -> None:
        self._loaded = loaded
        self._cluster = cluster  # None: join the Ray cluster it runs in (a test's fake)
        self._epoch = uuid.uuid4().hex
        self._core: _Core | None = None
        self._booting: asyncio.Task[_Core] | None = None

    async def _get(self) -> _Core:
        if self._core is not None:
            return self._core
        if self._booting is None:
            core = _Core(self._loaded, self._epoch, self._cluster)
            self._booting = asyncio.create_task(core.boot())
        try:
            self._core = await asyncio.shield(self._booting)
        except Exception:
            self._booting = None  # the next call tries again
            raise
        return self._core

    async def sync(self, report: Report) -> SyncReply:
        return (await self._get()).sync(report)

    async def ensure(self, name: str) -> Answer:
        return await (await self._get()).ensure(name)

    async def stop(self, name: str, reason: str) -> Answer:
        return await (await self._get()).stop(name, reason)

    async def stop_all(self, reason: str) -> list[str]:
        return await (await self._get()).sup.stop_all(reason)

    async def restart_autostart(self) -> tuple[list[str], dict[str, str]]:
        return await (await self._get()).sup.restart_autostart()

    async def reload(self, loaded: LoadedConfig) -> dict[str, list[str]]:
        core = await self._get()
        self._loaded = core.loaded = loaded
        return core.sup.reload(loaded)

    async def leave(self, replica: str) -> None:
        """A replica stops. The last one takes the models with it, as one manager does
        when it stops (a killed one is waited for: ORPHAN_SECONDS)."""
        core = await self._get()
        core.replicas.leave(replica)
        if not len(core.replicas):
            log.info("the last gateway replica left: stopping every model")
            await core.close()
            asyncio.get_running_loop().call_later(0.2, _exit_actor)  # after this answer

    async def alive(self) -> bool:
        """For the detached engine hosts' checks (and it starts a restarted controller's
        work: adopting them, counting replicas)."""
        await self._get()
        return True
