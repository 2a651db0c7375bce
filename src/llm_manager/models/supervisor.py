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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import aiohttp

from llm_manager.cluster.nodes import Cluster
from llm_manager.cluster.remote import RemoteEngine
from llm_manager.config import Amount, LoadedConfig, ModelConfig
from llm_manager.devices.base import Device
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.errors import DeviceUnavailable, ModelBusy, StartFailed
from llm_manager.logs import LogBook
from llm_manager.models import launch, scheduler
from llm_manager.models.footprint import HOST_KEY, FootprintBook, definition_of, read_usages
from llm_manager.models.pinning import pinned_conflict
from llm_manager.models.reaper import Reaper
from llm_manager.models.registry import Registry
from llm_manager.models.runstate import RunState
from llm_manager.models.runtime import ModelRuntime, RuntimeSettings, State
from llm_manager.models.scheduler import Claim, Fit, Holder
from llm_manager.models.sizing import SchemeNeeds, Sizer, SizingSettings, gguf_estimator
from llm_manager.models.turns import Turns, Wait
from llm_manager.store.footprints import FootprintStore

log = logging.getLogger(__name__)

# After evicting, how long to wait for the freed memory to show in the device readings.
MEMORY_SETTLE_SECONDS = 10.0
# States in which a model holds its booked memory (and may have to be waited for).
_HOLDING = frozenset({State.STARTING, State.HEALTH_CHECK, State.ROUTING, State.STOPPING})
# How often the memory of running models is read: often while one loads (its peak after
# load is what the next start plans with), less often while they serve.
MEASURE_LOADING = 0.5
MEASURE_SERVING = 1.0
MEASURE_GAP = 0.05
# A GPU with less free than this (MiB, or share of its total) reads "full": an engine that
# ends during its start then is taken to have run out of memory.
FULL_MIB = 256
FULL_SHARE = 0.02


@dataclass(frozen=True)
class Preview:
    """What info shows for a model: the scheme in use, or the one a start would pick now."""

    scheme: str | None
    command: str | None
    is_available: bool


def _sizing_settings(loaded: LoadedConfig) -> SizingSettings:
    server = loaded.config.server
    return SizingSettings(server.memory_margin, server.measured_raises_declared)


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
    # What each model's runtime is made with (a gateway replica's: cluster/replica.py).
    _runtime_type: Callable[..., ModelRuntime] = ModelRuntime

    def __init__(
        self,
        loaded: LoadedConfig,
        monitor: DeviceMonitor,
        http: aiohttp.ClientSession,
        logbook: LogBook,
        footprints: FootprintStore | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        server = loaded.config.server
        self.monitor = monitor
        self.cluster = cluster  # cluster mode (docs/cluster.md); None = this machine only
        self._http = http
        self._logbook = logbook
        self._reaper = Reaper()
        self._runstate = RunState(server.data_dir)
        # The placement of every model holding memory: its scheme, devices and MiB booked.
        self._fits: dict[str, Fit] = {}
        self.footprints = FootprintBook(footprints)
        self.sizer = Sizer(
            self.footprints,
            _sizing_settings(loaded),
            gguf_estimator(server.data_dir, loaded.base_dir),
        )
        self._headroom: dict[str, Amount] = dict(server.memory_headroom)
        self._measure_now = asyncio.Event()
        self._placement_lock = asyncio.Lock()
        self.turns = Turns()
        self._tasks: set[asyncio.Task[object]] = set()
        self._quieting: set[str] = set()  # models an idle stop is being confirmed for
        settings = _runtime_settings(loaded)
        self.registry: Registry[ModelRuntime] = Registry(
            (name, list(spec.aliases), self._new_runtime(name, spec, settings))
            for name, spec in loaded.config.models.items()
        )

    def _new_runtime(self, name: str, spec: ModelConfig, settings: RuntimeSettings) -> ModelRuntime:
        # A model removed and added back by reloads keeps its log.
        book = self._logbook
        model_log = book.get(name) if book.has(name) else book.create(name)
        return self._runtime_type(
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
        self.sizer.settings = _sizing_settings(loaded)
        self._headroom = dict(loaded.config.server.memory_headroom)
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
        self._spawn(self._read_estimates(self.runtimes), "memory estimates")
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
        await asyncio.to_thread(self.footprints.load)
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
        self._spawn(self._measure_loop(), "memory measurement")
        self._spawn(self._read_estimates(self.runtimes), "memory estimates")
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
            free = self._free(devices, exclude=runtime.name)
            fit = self._choose(runtime, self._plannable(runtime)[0], free)
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
        await self._read_estimates([runtime])
        schemes, problems = self._plannable(runtime)
        if not schemes:
            raise DeviceUnavailable("the model's memory is not known", "; ".join(problems))
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
            devices = self._free(snap.devices, exclude=runtime.name)
            result = self._choose(runtime, schemes, devices)
            if isinstance(result, Fit):
                self._book(runtime, result)
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
            async with self.quiesced(victims) as confirmed:
                now = time.monotonic()
                going = [v for v in confirmed if self.resolve(v).swappable(now)]
                if not going:  # each was used meanwhile (another replica): plan again
                    continue
                evicted.update(going)
                for name in going:
                    log.info("evicting %s to make room for %s", name, runtime.name)
                runtime.log.event(f"evicting {', '.join(going)} to make room")
                await asyncio.gather(
                    *(
                        self.resolve(v).stop(f"evicted to make room for {runtime.name}")
                        for v in going
                    )
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
            fit = self._fits.get(r.name)
            if (
                r is runtime
                or fit is None
                or r.name in already
                or r.spec.pinned
                or r.state not in _HOLDING
            ):
                continue
            claims = tuple(Claim(r.name, k, m) for k, m in fit.needs.items())
            holders.append(Holder(r.name, r.last_used, claims, r.spec.priority, r.swappable(now)))
        reserved = self.turns.reserved_before(wait)
        free_to_take = [h for h in holders if h.model not in reserved]
        for pool in (free_to_take, holders) if reserved else (holders,):
            for name, needs in schemes:
                eligible = self._eligible(runtime, name, devices)
                victims = scheduler.plan_eviction(name, needs, eligible, pool)
                if victims:
                    if pool is not free_to_take and reserved:
                        # Only by taking what a model ahead in the queue will take: wait
                        # for that model's turn to come first.
                        return victims, sorted(self.turns.ahead_of(wait, victims))
                    can_go = {h.model for h in pool if h.ready}
                    return victims, [v for v in victims if v not in can_go]
        return None  # even evicting every model that may be evicted would not be enough

    def _choose(
        self,
        runtime: ModelRuntime,
        schemes: list[tuple[str, dict[str, int]]],
        devices: list[Device],
    ) -> Fit | list[scheduler.Shortfall]:
        """scheduler.choose, each scheme on the nodes its ``nodes:`` labels allow."""
        if self.cluster is None:
            return scheduler.choose(schemes, devices)
        shortfalls = []
        for name, needs in schemes:
            eligible = self._eligible(runtime, name, devices)
            if not eligible and runtime.spec.schemes[name].nodes:
                wanted = runtime.spec.schemes[name].nodes
                labels = ", ".join(f"{k}={v}" for k, v in wanted.items())
                shortfalls.append(scheduler.Shortfall(name, f"a node with {labels}", 0, 0, True))
                continue
            result = scheduler.fit_scheme(name, needs, eligible)
            if isinstance(result, Fit):
                return result
            shortfalls.append(result)
        return shortfalls

    def _eligible(self, runtime: ModelRuntime, scheme: str, devices: list[Device]) -> list[Device]:
        """Cluster mode: the devices on the nodes that carry the scheme's ``nodes:`` labels."""
        wanted = runtime.spec.schemes[scheme].nodes
        if self.cluster is None or not wanted:
            return devices
        allowed = {n.name for n in self.cluster.nodes() if n.carries(wanted)}
        return [d for d in devices if d.node in allowed]

    async def host(self, node: str, model: str) -> RemoteEngine:
        if self.cluster is None:
            raise StartFailed(f"model {model!r} was placed on node {node}, but there is no cluster")
        return await self.cluster.host(node, model)

    def node_lost(self, node: str) -> None:
        log.warning("node %s left the cluster", node)
        self.monitor.invalidate()

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
        # A model that just became ready has its footprint after load: read it now, not
        # up to a sampling period later (a small model is loaded before the first sample).
        self._measure_now.set()

    # --- out of memory at start -----------------------------------------------------------

    async def make_room(self, runtime: ModelRuntime, fit: Fit) -> tuple[list[str], str]:
        """An engine ran out of memory while starting although the plan said it fits (a
        footprint larger than booked, or memory taken by programs we do not manage): stop
        the models on its devices that may go now (not pinned, nothing in flight), wait
        for their memory to show free, and say what the devices hold."""
        wanted = set(fit.needs)
        async with self._placement_lock:
            victims = [
                r
                for r in self.runtimes
                if r is not runtime
                and not r.spec.pinned
                and r.state is State.ROUTING
                and not r.admitted
                and wanted & set(self._fits.get(r.name, Fit("", {}, {})).needs)
            ]
            async with self.quiesced([v.name for v in victims]) as going:
                victims = [
                    v
                    for v in victims
                    if v.name in going and v.state is State.ROUTING and not v.admitted
                ]
                for victim in victims:
                    log.info(
                        "evicting %s: %s ran out of memory while starting",
                        victim.name,
                        runtime.name,
                    )
                await asyncio.gather(
                    *(
                        v.stop(f"evicted: {runtime.name} ran out of memory while starting")
                        for v in victims
                    )
                )
            if victims:
                await self._settle(fit)
        return [v.name for v in victims], await self.describe_memory(fit)

    async def _settle(self, fit: Fit) -> None:
        """Wait (a while at most) until the devices show the memory of a placement free."""
        deadline = time.monotonic() + MEMORY_SETTLE_SECONDS
        while time.monotonic() < deadline:
            snap = await self.monitor.snapshot(max_age=0)
            free = {d.key: d.memory_free for d in self._free(snap.devices, exclude="")}
            if all(free.get(key, 0) >= mib for key, mib in fit.needs.items()):
                return
            await asyncio.sleep(0.25)

    def full_device(self, fit: Fit) -> str | None:
        snap = self.monitor.latest
        if snap is None:
            return None
        for dev in snap.devices:
            gpu = dev.key in fit.needs and dev.measured and dev.kind != "cpu"
            if gpu and dev.memory_free < max(FULL_MIB, dev.memory_total * FULL_SHARE):
                return (
                    f"{dev.key} ({dev.name}) read full: {dev.memory_free} MiB free of "
                    f"{dev.memory_total}"
                )
        return None

    async def describe_memory(self, fit: Fit) -> str:
        """What the devices of a placement hold now: use, and the models booked there."""
        snap = await self.monitor.snapshot(max_age=0)
        # Readings plus what booked models will still take (all of it on a declared
        # device, which has no reading of its own).
        devices = scheduler.apply_claims(snap.devices, self._claims_of(exclude=""))
        parts = []
        for key in fit.needs:
            dev = next((d for d in devices if d.key == key), None)
            if dev is None:
                parts.append(f"{key}: not present")
                continue
            booked = []
            for name, other in self._fits.items():
                mib = other.needs.get(key)
                if mib is None:
                    continue
                runtime = self.registry.get(name)
                marks = []
                if runtime is not None and runtime.spec.pinned:
                    marks.append("pinned")
                if runtime is not None and runtime.admitted:
                    marks.append(f"{runtime.admitted} request(s) in flight")
                extra = f" ({', '.join(marks)})" if marks else ""
                booked.append(f"{name} {mib} MiB{extra}")
            models = f"; models booked there: {', '.join(booked)}" if booked else ""
            parts.append(
                f"{key} ({dev.name}): {dev.memory_used} of {dev.memory_total} MiB in use or "
                f"booked, {dev.memory_free} MiB free{models}"
            )
        return "; ".join(parts)

    def ready(self, name: str) -> None:
        self.footprints.ready(name)

    def release(self, name: str) -> None:
        self._fits.pop(name, None)
        self.footprints.end(name)

    def _node_reading(self, name: str, node: str, usage: dict[str, int]) -> dict[str, int]:
        """A node's reading under the cluster's device keys; its system memory under the
        plain host key when the scheme has no "cpu" device (as on one machine)."""
        placed = set(self.placed_on(name).values())
        out = {}
        for key, mib in usage.items():
            qualified = f"{node}/{key}"
            out[qualified if key != HOST_KEY or qualified in placed else HOST_KEY] = mib
        return out

    def booked(self, name: str) -> dict[str, int]:
        """MiB booked by a model holding memory, by its scheme's device keys ({} if none)."""
        fit = self._fits.get(name)
        if fit is None:
            return {}
        return {key: fit.needs[dev] for key, dev in fit.assignment.items()}

    def placed_on(self, name: str) -> dict[str, str]:
        """The devices a model holding memory was placed on: scheme key -> Device.key."""
        fit = self._fits.get(name)
        return dict(fit.assignment) if fit is not None else {}

    def sizes(self, runtime: ModelRuntime) -> dict[str, SchemeNeeds]:
        """How each of the model's schemes would be planned now (sizing.py); an estimate
        not read yet (``_read_estimates``) counts as none: nothing here reads a file."""
        return {
            n: self.sizer.size(runtime.name, n, s, read=False)
            for n, s in runtime.spec.schemes.items()
        }

    async def _read_estimates(self, runtimes: list[ModelRuntime]) -> None:
        """Read every scheme's GGUF estimate ahead, in a thread, so that info and the
        first start have it without blocking the event loop."""
        for runtime in runtimes:
            for name, scheme in runtime.spec.schemes.items():
                await self.sizer.prepare(runtime.name, name, scheme)

    def _plannable(
        self, runtime: ModelRuntime
    ) -> tuple[list[tuple[str, dict[str, int]]], list[str]]:
        """(scheme name, MiB per device key) of the schemes whose memory is known, and why
        the others cannot be planned."""
        schemes, problems = [], []
        for name, sized in self.sizes(runtime).items():
            needs = sized.needs
            if needs is None:
                problems.append(sized.problem() or name)
            else:
                schemes.append((name, needs))
        return schemes, problems

    def _book(self, runtime: ModelRuntime, fit: Fit) -> None:
        self._fits[runtime.name] = fit
        scheme = runtime.spec.schemes[fit.scheme]
        self.footprints.begin(
            runtime.name, fit.scheme, definition_of(scheme), fit.assignment, scheme.devices
        )

    def _free(self, devices: list[Device], exclude: str) -> list[Device]:
        """Free memory for planning: the readings, less what booked models will still take
        (claims), less the headroom kept free."""
        claims = scheduler.apply_claims(devices, self._claims_of(exclude))
        return scheduler.keep_free(claims, self._headroom)

    def _claims_of(self, exclude: str) -> list[Claim]:
        out = []
        for name, fit in self._fits.items():
            if name == exclude:
                continue
            routing = self.resolve(name).state is State.ROUTING
            seen = self.footprints.current(name)
            for dev, mib in fit.needs.items():
                # What a reading of the device already includes: the model's processes as
                # measured there; for a routing model whose processes the reading does not
                # list (NVML in a container), all of it.
                shown = seen.get(dev, mib if routing else 0)
                out.append(Claim(name, dev, mib, shown))
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
                if runtime.name in self._quieting:
                    continue  # asked already, not answered yet
                if runtime.restart_due or runtime.idle_due(now):
                    self._quieting.add(runtime.name)
                    self._spawn(self._unload_idle(runtime), f"idle stop {runtime.name}")

    async def _unload_idle(self, runtime: ModelRuntime) -> None:
        """Stop an idle model (or restart one whose definition changed), unless it was used
        while that was confirmed (gateway replicas: ``quiesced``)."""
        try:
            async with self.quiesced([runtime.name]) as going:
                now = time.monotonic()
                if not going:
                    return
                if runtime.restart_due:
                    await runtime.restart_for_config()
                elif runtime.idle_due(now):
                    minutes = runtime.idle_timeout / 60
                    await runtime.stop(f"idle {minutes:g} min")
        finally:
            self._quieting.discard(runtime.name)

    @contextlib.asynccontextmanager
    async def quiesced(self, names: Sequence[str]) -> AsyncIterator[list[str]]:
        """Of the models about to be stopped as unused (idle, evicted), those that may go.
        One manager sees every request itself: all of them. The controller of gateway
        replicas first makes every replica stop routing to them (cluster/controller.py)."""
        yield list(names)

    async def _measure_loop(self) -> None:
        """Read what each running model's processes hold, for the footprint book."""
        while True:
            active = [r for r in self.runtimes if r.pid is not None and r.name in self._fits]
            loading = any(r.state is not State.ROUTING for r in active)
            period = MEASURE_LOADING if loading or not active else MEASURE_SERVING
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._measure_now.wait(), period)
                await asyncio.sleep(MEASURE_GAP)  # changes come in bursts: one reading
            self._measure_now.clear()
            active = [r for r in self.runtimes if r.pid is not None and r.name in self._fits]
            if active:
                with contextlib.suppress(Exception):  # a failed reading is skipped, not fatal
                    await self.measure(active)

    async def measure(self, runtimes: list[ModelRuntime]) -> None:
        pids = {r.name: pid for r in runtimes if (pid := r.pid) is not None}
        readings: dict[str, dict[str, int]] = {}
        local = {r.name: pids[r.name] for r in runtimes if r.name in pids and r.node is None}
        if local:
            snap = await self.monitor.snapshot(max_age=MEASURE_SERVING)
            readings.update(await asyncio.to_thread(read_usages, local, snap.devices))
        nodes: dict[str, dict[str, int]] = {}
        for r in runtimes:
            if r.name in pids and r.node is not None:
                nodes.setdefault(r.node, {})[r.name] = pids[r.name]
        cluster = self.cluster
        for node, on_node in nodes.items():
            if cluster is None:
                break
            # Read by the node's agent, there; keys made the cluster's ("w1/cuda:0").
            found = await asyncio.to_thread(cluster.usages, node, on_node)
            for name, held in found.items():
                readings[name] = self._node_reading(name, node, held)
        for runtime in runtimes:
            usage = readings.get(runtime.name)
            if not usage or runtime.pid != pids.get(runtime.name):
                continue  # gone, or restarted while it was read
            for warning in self.footprints.record(runtime.name, usage, runtime.serving):
                runtime.log.event(f"memory: {warning}")
                log.warning("model %s: %s", runtime.name, warning)
