"""A gateway replica (docs/replicas.md): its models are run by the cluster's controller
(cluster/controller.py); it routes requests to them and counts them.

Each model here is a ``ReplicaRuntime``: the request side of a runtime (counts, the turn
door, the concurrency gate) is its own, its state is the controller's as last reported.
A request for a model seen routing (and not draining) goes straight to the engine; any
other asks the controller, which starts the model once for every replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from llm_manager.cluster.shared import (
    REPLICA_TTL,
    SYNC_PERIOD,
    Answer,
    Counts,
    ModelView,
    Report,
    SyncReply,
)
from llm_manager.config import LoadedConfig
from llm_manager.errors import ModelUnavailable
from llm_manager.models.runtime import ModelRuntime, State
from llm_manager.models.supervisor import Supervisor

log = logging.getLogger(__name__)


_UNTOLD = (-1.0, -1)  # a keep_alive no request sets: the next report tells the real one


class ControllerLink:
    """The controller's methods as coroutines; a controller that cannot be reached (ended,
    restarting) is a 503 for the request that needed it."""

    def __init__(
        self, handle: Any, label: str, renew: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self._handle = handle
        self._renew = renew
        self.replica = uuid.uuid4().hex
        self.label = label

    async def renew(self) -> None:
        """Find the controller again, or start one (the one known ended for good: a new
        one adopts its engines)."""
        if self._renew is not None:
            self._handle = await self._renew()

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()
            raise ModelUnavailable(
                "the cluster's controller cannot be reached",
                text[0] if text else type(exc).__name__,
            ) from None


class ReplicaRuntime(ModelRuntime):
    def __init__(self, *args: Any, link: ControllerLink, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._link = link
        self._view: ModelView | None = None
        self._stamp = 0  # of the view shown: an older one (same epoch) is ignored
        self._epoch = ""  # the controller run that made it
        self._draining = False
        self.requests = 0  # begun here (the controller sees a rise as use)
        self.keep_alive_told: tuple[float, int] | None = None  # as last reported

    @property
    def pid(self) -> int | None:
        return self._view.pid if self._view is not None else None

    @property
    def node(self) -> str | None:
        return self._view.node if self._view is not None else None

    @property
    def view(self) -> ModelView | None:
        return self._view

    def idle_seconds(self, now: float | None = None) -> float:
        return self._view.idle_seconds if self._view is not None else 0.0

    def acquire(self) -> None:
        super().acquire()
        self.requests += 1

    def show(self, view: ModelView, stamp: int, epoch: str) -> None:
        """Take the controller's view of the model, unless a newer one of the same
        controller run is shown already (a restarted controller counts afresh)."""
        if epoch == self._epoch and stamp <= self._stamp:
            return
        self._stamp = stamp
        self._epoch = epoch
        self._view = view
        self._draining = view.draining
        self._state = State(view.state)
        self.host = view.host
        self.port = view.port
        auth = view.auth
        self.engine_auth = (b"authorization", auth.encode()) if auth is not None else None
        self.scheme = view.scheme
        self.failure_reason = view.failure_reason
        self.stop_reason = view.stop_reason
        self.stops = view.stops
        self.start_count = view.start_count
        self.crash_count = view.crash_count
        self.node_losses = view.node_losses
        self.last_start_seconds = view.last_start_seconds
        self.waiting_for = view.waiting_for
        left = view.turn_left
        self.set_turn_end(None if left is None else time.monotonic() + left)

    def _take(self, answer: Answer) -> None:
        if answer.failure is not None:
            raise answer.failure.error()
        if answer.view is not None:
            self.show(answer.view, answer.stamp, answer.epoch)

    def routes_now(self) -> bool:
        return self._state is State.ROUTING and not self._draining and self.port is not None

    async def ensure_ready(self) -> str:
        while True:
            if self.routes_now():
                return self.base_url
            self._start_waiters += 1
            try:
                answer: Answer = await self._link.call("ensure", self.name)
            finally:
                self._start_waiters -= 1
            self._take(answer)
            view = answer.view
            if view is not None and view.state == State.ROUTING and not view.draining:
                # Shown even if a newer sync reply overtook it: the controller said ready.
                return f"http://{view.host}:{view.port}"

    async def stop(self, reason: str = "requested") -> bool:
        answer: Answer = await self._link.call("stop", self.name, reason)
        self._take(answer)
        return answer.stopped


class ReplicaSupervisor(Supervisor):
    """The supervisor of a gateway replica: the registry and the planner's preview are its
    own; starting, stopping and the memory ledger are the controller's."""

    def __init__(self, *args: Any, link: ControllerLink, **kwargs: Any) -> None:
        self.link = link
        self._runtime_type = functools.partial(ReplicaRuntime, link=link)
        super().__init__(*args, **kwargs)
        self._epoch = ""
        self._seen = 0  # the stamp of the newest sync reply applied
        self._marks: dict[str, int] = {}  # per model, the controller's log seq copied
        self.replicas = 0  # live replicas, as the controller last said
        self._shown_models: list[str] = []  # the controller's, as last said
        self.reached: float | None = None  # when the controller last answered a sync

    async def start(self) -> None:
        await asyncio.to_thread(self.footprints.load)
        await self._sync_once()  # the controller is started (or found) before serving
        self._compare_models()
        self._spawn(self._sync_loop(), "replica sync")
        self._spawn(self._read_estimates(self.runtimes), "memory estimates")

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.link.call("leave", self.link.replica)
        except ModelUnavailable as exc:
            log.warning("could not tell the controller this replica leaves: %s", exc.detail)

    def reload(self, loaded: LoadedConfig) -> dict[str, list[str]]:
        report = super().reload(loaded)
        self._spawn(self.link.call("reload", loaded), "controller reload")
        return report

    async def stop_all(self, reason: str = "stop-all requested") -> list[str]:
        stopped: list[str] = await self.link.call("stop_all", reason)
        return stopped

    async def restart_autostart(self) -> tuple[list[str], dict[str, str]]:
        done: tuple[list[str], dict[str, str]] = await self.link.call("restart_autostart")
        return done

    def booked(self, name: str) -> dict[str, int]:
        view = self._view_of(name)
        return dict(view.booked) if view is not None else {}

    def placed_on(self, name: str) -> dict[str, str]:
        view = self._view_of(name)
        return dict(view.placed_on) if view is not None else {}

    def _view_of(self, name: str) -> ModelView | None:
        runtime = self.registry.get(name)
        return runtime.view if isinstance(runtime, ReplicaRuntime) else None

    def _compare_models(self) -> None:
        """Say so when this replica's models are not the controller's (it runs the
        configuration of the replica that created it: docs/replicas.md)."""
        mine = {r.name for r in self.runtimes}
        theirs = set(self._shown_models)
        if mine != theirs:
            log.warning(
                "this replica's configuration differs from the controller's: models only "
                "here: %s; only there: %s (reload this replica, or every one, to align them)",
                ", ".join(sorted(mine - theirs)) or "none",
                ", ".join(sorted(theirs - mine)) or "none",
            )

    def controller_health(self) -> dict[str, Any]:
        """For /health: whether the controller answers, and how many replicas it counts."""
        reached = self.reached
        ago = None if reached is None else round(time.monotonic() - reached, 2)
        return {
            "ok": ago is not None and ago < REPLICA_TTL,
            "answered_seconds_ago": ago,
            "replicas": self.replicas,
        }

    # --- the sync with the controller -------------------------------------------------

    def _report(self) -> Report:
        counts = {}
        keep_alive = {}
        for runtime in self.runtimes:
            if isinstance(runtime, ReplicaRuntime):
                counts[runtime.name] = Counts(runtime.pending, runtime.admitted, runtime.requests)
                if runtime.keep_alive != runtime.keep_alive_told:
                    keep_alive[runtime.name] = runtime.keep_alive_told = runtime.keep_alive
        marks = dict(self._marks)
        return Report(self.link.replica, self.link.label, self._seen, counts, marks, keep_alive)

    def _apply(self, reply: SyncReply) -> None:
        if reply.epoch != self._epoch:
            if self._epoch:
                log.warning("the controller restarted: its models were started afresh")
            self._epoch = reply.epoch
            self._marks.clear()
        for name, view in reply.models.items():
            shown = self.registry.get(name)
            if isinstance(shown, ReplicaRuntime):
                shown.show(view, reply.stamp, reply.epoch)
                self.footprints.show(name, view.memory_now)
        for name, lines in reply.logs.items():
            if not lines:
                continue
            copied = self.registry.get(name)
            if copied is not None:
                for line in lines:
                    copied.log.copy(line.timestamp, line.stream, line.message, line.level)
            self._marks[name] = lines[-1].seq
        self._shown_models = list(reply.models)
        self.replicas = reply.replicas
        self.reached = time.monotonic()
        self._seen = reply.stamp  # only now: every view of this reply is shown

    async def _sync_once(self) -> None:
        report = self._report()
        try:
            reply: SyncReply = await self.link.call("sync", report)
        except ModelUnavailable:
            for name in report.keep_alive:  # not delivered: told again next time
                runtime = self.registry.get(name)
                if isinstance(runtime, ReplicaRuntime):
                    runtime.keep_alive_told = _UNTOLD
            raise
        self._apply(reply)

    async def _sync_loop(self) -> None:
        failing: float | None = None  # since when the controller does not answer
        while True:
            await asyncio.sleep(SYNC_PERIOD)
            try:
                await self._sync_once()
            except ModelUnavailable as exc:
                now = time.monotonic()
                if failing is None:
                    log.error("%s: %s", exc.message, exc.detail)
                    failing = now
                elif now - failing > REPLICA_TTL:
                    # Not a restart in progress (Ray answers those): look for it again.
                    try:
                        await self.link.renew()
                    except Exception as renewing:
                        log.error("no controller could be found or started: %s", renewing)
                    failing = time.monotonic()
                continue
            if failing is not None:
                log.warning("the controller answers again")
            failing = None
