"""All managed models together: placement on devices, idle unload, auto-start, shutdown.

The supervisor owns the resource ledger (which model holds which MiB on which device);
each runtime owns its own state. Placement decisions run one at a time under one lock,
so two concurrent starts never both claim the same free memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import aiohttp

from llm_manager.config import LoadedConfig, ModelConfig
from llm_manager.devices.base import Device
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.errors import DeviceUnavailable, ModelBusy
from llm_manager.logs import LogBook
from llm_manager.models import launch, scheduler
from llm_manager.models.pinning import pinned_conflict
from llm_manager.models.reaper import Reaper
from llm_manager.models.registry import Registry
from llm_manager.models.runstate import RunState
from llm_manager.models.runtime import ModelRuntime, RuntimeSettings, State
from llm_manager.models.scheduler import Claim, Fit, Holder
from llm_manager.models.turns import Turns, Wait

log = logging.getLogger(__name__)

# After evicting, how long to wait for the freed memory to show in the device readings.
MEMORY_SETTLE_SECONDS = 10.0
# States in which a model holds its booked memory (and may have to be waited for).
_HOLDING = frozenset({State.STARTING, State.HEALTH_CHECK, State.ROUTING, State.STOPPING})


@dataclass(frozen=True)
class Preview:
    """What info shows for a model: the scheme in use, or the one a start would pick now."""

    scheme: str | None
    command: str | None
    is_available: bool


def _runtime_settings(loaded: LoadedConfig) -> RuntimeSettings:
    server = loaded.config.server
    return RuntimeSettings(
        startup_timeout=server.startup_timeout,
        stop_timeout=server.stop_timeout,
        idle_timeout=server.idle_timeout,
        data_dir=server.data_dir,
        base_dir=loaded.base_dir,
        queue_timeout=server.queue_timeout,
        turn_time=server.turn_time,
        turn_linger=server.turn_linger,
    )


class Supervisor:
    def __init__(
        self,
        loaded: LoadedConfig,
        monitor: DeviceMonitor,
        http: aiohttp.ClientSession,
        logbook: LogBook,
    ) -> None:
        server = loaded.config.server
        self.monitor = monitor
        self._http = http
        self._logbook = logbook
        self._reaper = Reaper()
        self._runstate = RunState(server.data_dir)
        self._claims: dict[str, tuple[tuple[str, int], ...]] = {}
        self._placement_lock = asyncio.Lock()
        self.turns = Turns()
        self._tasks: set[asyncio.Task[object]] = set()
        settings = _runtime_settings(loaded)
        self.registry: Registry[ModelRuntime] = Registry(
            (name, list(spec.aliases), self._new_runtime(name, spec, settings))
            for name, spec in loaded.config.models.items()
        )

    def _new_runtime(self, name: str, spec: ModelConfig, settings: RuntimeSettings) -> ModelRuntime:
        # A model removed and added back by reloads keeps its log.
        book = self._logbook
        model_log = book.get(name) if book.has(name) else book.create(name)
        return ModelRuntime(
            name,
            spec,
            settings,
            placer=self,
            log=model_log,
            http=self._http,
            reaper=self._reaper,
            runstate=self._runstate,
        )

    # --- reload ---------------------------------------------------------------------------

    def reload(self, loaded: LoadedConfig) -> dict[str, list[str]]:
        """Adopt a new (already validated) configuration's models.

        Unchanged models keep running untouched; changed ones take their new definition
        now if stopped, else when next idle (restarted then); removed ones leave the
        registry at once (new requests get 404) and are stopped once idle; new ones are
        added stopped. Returns what happened to each model.
        """
        settings = _runtime_settings(loaded)
        old = dict(self.registry.items())
        report: dict[str, list[str]] = {
            "added": [],
            "removed": [],
            "changed": [],
            "restart_pending": [],
            "unchanged": [],
        }
        entries = []
        for name, spec in loaded.config.models.items():
            runtime = old.get(name)
            if runtime is None:
                runtime = self._new_runtime(name, spec, settings)
                report["added"].append(name)
            elif runtime.spec == spec:
                runtime.reconfigure(spec, settings)
                report["unchanged"].append(name)
            elif runtime.reconfigure(spec, settings):
                report["changed"].append(name)
            else:
                report["restart_pending"].append(name)
            entries.append((name, list(spec.aliases), runtime))
        self.registry = Registry(entries)
        for name, runtime in old.items():
            if name not in loaded.config.models:
                report["removed"].append(name)
                self._spawn(self._retire(runtime), f"retire {name}")
        return report

    async def _retire(self, runtime: ModelRuntime) -> None:
        """Stop a model removed from the configuration once its requests have ended."""
        while runtime.pending:
            await asyncio.sleep(0.1)
        await runtime.stop("removed from the configuration")

    # --- lifetime -----------------------------------------------------------------------

    async def start(self) -> None:
        """Clean up after an earlier run, start the reaper and the idle loop, and begin the
        auto-start models in the background (the HTTP server does not wait for them)."""
        killed = self._runstate.cleanup_previous()
        if killed:
            log.warning("killed %d model process(es) left by an earlier run", len(killed))
        for name, pid in killed:
            runtime = self.registry.get(name)
            if runtime is not None:  # in its own log too: why its earlier process vanished
                runtime.log.event(
                    f"the manager's earlier run ended without stopping this model; "
                    f"its process {pid} was killed at this start"
                )
        await self._reaper.start()
        self._spawn(self._warn_unknown_devices(), "device check")
        self._spawn(self._idle_loop(), "idle unload")
        self._spawn(self._autostart(), "auto-start")

    async def shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stop_all("manager shutting down")
        await self._reaper.close()

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[object] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- queries --------------------------------------------------------------------------

    def resolve(self, name: str) -> ModelRuntime:
        return self.registry.resolve(name)

    @property
    def runtimes(self) -> list[ModelRuntime]:
        return self.registry.values()

    def preview(self, runtime: ModelRuntime, devices: list[Device]) -> Preview:
        schemes = runtime.spec.schemes
        available = any(scheduler.is_present(s.devices, devices) for s in schemes.values())
        chosen: str | None = None
        if runtime.state is not State.STOPPED and runtime.scheme is not None:
            chosen = runtime.scheme
        else:
            free = scheduler.apply_claims(devices, self._claims_of(exclude=runtime.name))
            fit = scheduler.choose([(n, s.devices) for n, s in schemes.items()], free)
            if isinstance(fit, Fit):
                chosen = fit.scheme
            else:
                chosen = next(
                    (n for n, s in schemes.items() if scheduler.is_present(s.devices, devices)),
                    None,
                )
        command = launch.describe(schemes[chosen]) if chosen is not None else None
        return Preview(chosen, command, available)

    # --- placement (the runtime's Placer) -----------------------------------------------

    async def place(self, runtime: ModelRuntime) -> tuple[Fit, list[int]]:
        """Book room for a model, evicting others if needed, and waiting while the models
        that must make room are busy (up to the model's queue_timeout); see design.md
        beside this file."""
        schemes = [(n, s.devices) for n, s in runtime.spec.schemes.items()]
        wait = self.turns.enter(runtime.name, runtime.spec.priority, runtime.queue_timeout)
        try:
            while True:
                changed = self.turns.changed_event()  # taken before looking: no missed wake
                async with self._placement_lock:
                    placed = await self._try_place(runtime, schemes, wait)
                if placed is not None:
                    return placed
                self._retune()
                timeout = self._next_look(wait)
                if timeout <= 0:
                    raise self._busy(runtime, wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout)
        finally:
            self.turns.leave(wait)
            runtime.waiting_for = ()
            self._retune()

    async def _try_place(
        self, runtime: ModelRuntime, schemes: list[tuple[str, dict[str, int]]], wait: Wait
    ) -> tuple[Fit, list[int]] | None:
        """Under the placement lock: a fit (booked), or None after recording in ``wait``
        what must happen first. Raises DeviceUnavailable when nothing could ever make room."""
        evicted: set[str] = set()
        settle_until = 0.0
        while True:
            # After an eviction, read the devices afresh: the memory must actually be
            # free (a GPU releases an exited process's memory a moment later).
            snap = await self.monitor.snapshot(max_age=0 if evicted else None)
            devices = scheduler.apply_claims(snap.devices, self._claims_of(exclude=runtime.name))
            result = scheduler.choose(schemes, devices)
            if isinstance(result, Fit):
                self._claims[runtime.name] = tuple(result.needs.items())
                return result, result.gpu_indices(snap.devices)
            if time.monotonic() < settle_until:
                await asyncio.sleep(0.25)
                continue
            plan = self._plan(runtime, schemes, devices, evicted, wait)
            if plan is None:
                details = "; ".join(s.describe() for s in result)
                raise DeviceUnavailable("device unavailable or insufficient resources", details)
            victims, blockers = plan
            wait.victims = frozenset(victims)
            if blockers:
                self._note_wait(runtime, wait, blockers)
                return None
            evicted.update(victims)
            for name in victims:
                log.info("evicting %s to make room for %s", name, runtime.name)
            runtime.log.event(f"evicting {', '.join(victims)} to make room")
            await asyncio.gather(
                *(self.resolve(v).stop(f"evicted to make room for {runtime.name}") for v in victims)
            )
            settle_until = time.monotonic() + MEMORY_SETTLE_SECONDS

    def _plan(
        self,
        runtime: ModelRuntime,
        schemes: list[tuple[str, dict[str, int]]],
        devices: list[Device],
        already: set[str],
        wait: Wait,
    ) -> tuple[list[str], list[str]] | None:
        """(victims, blockers): the models to evict, and those of them that cannot go yet
        (or the higher-ranked waiting models this one must let go first). None when even
        evicting every model that may be evicted would not make room."""
        now = time.monotonic()
        holders = []
        for r in self.runtimes:
            if (
                r is runtime
                or r.name not in self._claims
                or r.name in already
                or r.spec.pinned
                or r.state not in _HOLDING
            ):
                continue
            claims = tuple(Claim(r.name, k, m) for k, m in self._claims[r.name])
            holders.append(Holder(r.name, r.last_used, claims, r.spec.priority, r.swappable(now)))
        reserved = self.turns.reserved_before(wait)
        free_to_take = [h for h in holders if h.model not in reserved]
        for pool in (free_to_take, holders) if reserved else (holders,):
            for name, needs in schemes:
                victims = scheduler.plan_eviction(name, needs, devices, pool)
                if victims:
                    if pool is not free_to_take and reserved:
                        # Only by taking what a model ahead in the queue will take: wait
                        # for that model's turn to come first.
                        return victims, sorted(self.turns.ahead_of(wait, victims))
                    can_go = {h.model for h in pool if h.ready}
                    return victims, [v for v in victims if v not in can_go]
        return None  # even evicting every model that may be evicted would not be enough

    def _note_wait(self, runtime: ModelRuntime, wait: Wait, blockers: list[str]) -> None:
        names = tuple(blockers)
        if names != runtime.waiting_for:
            runtime.waiting_for = names
            described = ", ".join(self._describe_blocker(n) for n in names)
            runtime.log.event(f"waiting for room: {described}")
            log.info("%s waits for room: %s", runtime.name, described)

    def _describe_blocker(self, name: str) -> str:
        other = self.registry.get(name)
        if other is None:
            return name
        if other.state is not State.ROUTING:
            return f"{name} ({other.state.value})"
        return f"{name} ({other.admitted} request(s) in flight)"

    def _retune(self) -> None:
        """Set every model's turn end from the waits that name it (see Turns)."""
        ends = self.turns.turn_ends(
            {r.name: (r.ready_at, r.turn_time) for r in self.runtimes if r.ready_at is not None}
        )
        for r in self.runtimes:
            when = ends.get(r.name)
            if when is not None and r.turn_ends is None:
                others = ", ".join(self.turns.waiting_on(r.name))
                r.log.event(
                    f"{others} wait(s) for its memory: taking new requests for "
                    f"{max(0.0, when - time.monotonic()):.1f} s more at most"
                )
            r.set_turn_end(when)

    def _next_look(self, wait: Wait) -> float:
        """Seconds until the wait should look again by itself (a change wakes it sooner);
        0 or less once its queue_timeout has passed."""
        now = time.monotonic()
        left = wait.deadline - now
        for name in wait.victims:
            other = self.registry.get(name)
            linger = None if other is None else other.linger_left(now)
            if linger is not None:
                left = min(left, max(0.01, linger))
        return left

    def _busy(self, runtime: ModelRuntime, wait: Wait) -> ModelBusy:
        names = ", ".join(runtime.waiting_for) or "other models"
        return ModelBusy(
            f"model {runtime.name!r} waited {runtime.queue_timeout:g} s (queue_timeout) for "
            f"room on its devices, held by: {names}",
            retry_after=min(60.0, runtime.turn_time or 1.0),
        )

    def changed(self) -> None:
        self.turns.notify()

    def release(self, name: str) -> None:
        self._claims.pop(name, None)

    def _claims_of(self, exclude: str) -> list[Claim]:
        out = []
        for name, held in self._claims.items():
            if name == exclude:
                continue
            # A routing model's memory already shows in probed readings.
            reflected = self.resolve(name).state is State.ROUTING
            out += [Claim(name, key, mib, reflected) for key, mib in held]
        return out

    # --- bulk operations ----------------------------------------------------------------

    async def stop_all(self, reason: str = "stop-all requested") -> list[str]:
        active = [r for r in self.runtimes if r.state is not State.STOPPED]
        results = await asyncio.gather(*(r.stop(reason) for r in active), return_exceptions=True)
        return [r.name for r, ok in zip(active, results, strict=True) if ok is True]

    async def restart_autostart(self) -> tuple[list[str], dict[str, str]]:
        """Restart every auto_start model; returns (started, {name: error})."""
        targets = [r for r in self.runtimes if r.spec.auto_start]
        await asyncio.gather(*(r.stop("restart-autostart") for r in targets))
        results = await asyncio.gather(*(r.ensure_ready() for r in targets), return_exceptions=True)
        started, failed = [], {}
        for runtime, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                failed[runtime.name] = str(result)
            else:
                started.append(runtime.name)
        return started, failed

    async def _autostart(self) -> None:
        targets = [r for r in self.runtimes if r.spec.auto_start]
        results = await asyncio.gather(*(r.ensure_ready() for r in targets), return_exceptions=True)
        for runtime, result in zip(targets, results, strict=True):
            if isinstance(result, BaseException):
                log.error("auto-start of %s failed: %s", runtime.name, result)

    async def _warn_unknown_devices(self) -> None:
        """Name, once at start, the scheme device keys that match no device at all, and
        pinned models that cannot all be loaded on the devices found."""
        snap = await self.monitor.snapshot()
        known = [d for r in snap.reports for d in r.devices]
        conflict = pinned_conflict(
            {r.name: r.spec for r in self.runtimes}, known, "this machine's devices"
        )
        if conflict is not None:
            log.warning("%s", conflict)
        for runtime in self.runtimes:
            for scheme, spec in runtime.spec.schemes.items():
                for key in spec.devices:
                    if not any(scheduler.matches(key, d) for d in known):
                        log.warning(
                            "model %s, scheme %s: device %r matches no device on this machine",
                            runtime.name,
                            scheme,
                            key,
                        )

    async def _idle_loop(self) -> None:
        while True:
            # Recomputed each turn: a reload can change the timeouts.
            timeouts = [r.idle_timeout for r in self.runtimes if r.idle_timeout > 0]
            tick = min(1.0, max(0.05, min(timeouts, default=10.0) / 10))
            await asyncio.sleep(tick)
            now = time.monotonic()
            for runtime in self.runtimes:
                if runtime.restart_due:
                    self._spawn(runtime.restart_for_config(), f"reconfigure {runtime.name}")
                elif runtime.idle_due(now):
                    minutes = runtime.idle_timeout / 60
                    self._spawn(runtime.stop(f"idle {minutes:g} min"), f"idle stop {runtime.name}")
