"""What runs on a cluster node, inside Ray actors (cluster/ray_backend.py wraps these
classes with ``ray.remote``; nothing here imports Ray, so they are plain classes in tests).

``NodeAgent`` reads the node's devices with the same providers the manager uses on its own
machine. ``EngineHost`` owns one engine process on its node exactly as the local runtime
does: its own process group, the parent-death signal, a reaper that kills the group if the
host's process dies (a killed node, a manager gone), the stop escalation, and its output
kept as numbered lines for the manager to fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence

from llm_manager.config import DeviceConfig
from llm_manager.devices.base import DeviceProvider, ProviderReport
from llm_manager.devices.cpu import CpuProvider
from llm_manager.devices.cuda import CudaProvider
from llm_manager.devices.monitor import probe_all
from llm_manager.devices.static import StaticProvider
from llm_manager.models import launch
from llm_manager.models.footprint import read_usages
from llm_manager.models.process import ModelProcess
from llm_manager.models.reaper import Reaper

# The node's declared devices (llm-manager node --device), as a JSON list of DeviceConfig.
DEVICES_ENV = "LLM_MANAGER_NODE_DEVICES"
KEPT_LINES = 20_000  # output lines a host keeps for the manager to fetch
# Set by Ray in its workers for Ray's own use; an engine gets the node's environment
# without them, and CUDA_VISIBLE_DEVICES as the planner decided (never Ray's).
_RAY_SET = ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def declared_devices(environ: Mapping[str, str]) -> list[DeviceConfig]:
    raw = environ.get(DEVICES_ENV)
    if not raw:
        return []
    return [DeviceConfig.model_validate(item) for item in json.loads(raw)]


def engine_env(node_env: Mapping[str, str], wanted: Mapping[str, str]) -> dict[str, str]:
    """The node's environment less what Ray set for its worker, plus the launch's."""
    env = {
        k: v
        for k, v in node_env.items()
        if not k.startswith("RAY_") and k not in _RAY_SET and k != DEVICES_ENV
    }
    env.update(wanted)
    return env


class NodeAgent:
    """One per node: its device readings."""

    def __init__(self) -> None:
        providers: list[DeviceProvider] = [CpuProvider(), CudaProvider()]
        declared = declared_devices(os.environ)
        if declared:
            providers.append(StaticProvider(declared))
        self._providers = providers

    def probe(self) -> list[ProviderReport]:
        return list(probe_all(self._providers))

    def usages(self, pids: dict[str, int]) -> dict[str, dict[str, int]]:
        """What the engines on this node hold (footprint.read_usages, run here)."""
        devices = [d for r in probe_all(self._providers) if r.online for d in r.devices]
        return read_usages(pids, devices)


class EngineHost:
    """One engine process on this node. Every method is a coroutine: Ray runs them on the
    actor's event loop, concurrently (a ``lines`` call waiting does not block ``stop``)."""

    def __init__(self) -> None:
        self._proc: ModelProcess | None = None
        self._reaper: Reaper | None = None
        self._lines: deque[tuple[int, str, str]] = deque(maxlen=KEPT_LINES)
        self._seq = 0
        self._news: asyncio.Event | None = None
        self._closed = False
        self._kept: object = None  # what its owner needs to adopt the engine again

    async def keep(self, kept: object) -> None:
        """Hold what the owner needs to adopt this engine after a restart of its own (the
        controller of gateway replicas: cluster/controller.py)."""
        self._kept = kept

    async def describe(self) -> tuple[object, int, int | None, int]:
        """(what was kept, the engine's PID, its exit code or None, the last line's number)."""
        proc = self._proc
        if proc is None:
            return self._kept, 0, 0, self._seq
        return self._kept, proc.pid, proc.returncode, self._seq

    async def guard(
        self, owner_alive: Callable[[], Awaitable[bool]], grace: float, period: float
    ) -> None:
        """Until the engine ends: once the owner has been gone for ``grace`` seconds (not
        restarting: gone), stop the engine. For a detached host, which nothing else ends."""
        missing: float | None = None
        while self._proc is not None and self._proc.returncode is None:
            await asyncio.sleep(period)
            if await owner_alive():
                missing = None
                continue
            now = time.monotonic()
            missing = now if missing is None else missing
            if now - missing >= grace:
                await self.stop(5.0)
                return

    async def free_port(self, host: str) -> int:
        return launch.free_port(host)

    async def start(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, script: bool
    ) -> int:
        """Spawn the engine; its PID. Raises StartFailed (a program not found here) or
        OSError (it cannot be run)."""
        self._news = asyncio.Event()
        full_env = engine_env(os.environ, env)
        run = launch.node_argv(argv, script, full_env, cwd)
        # Detached: Ray kills a worker's own children with it (the engine, by its
        # parent-death signal, too), and the reaper must outlive it to kill the group.
        self._reaper = Reaper(detached=True)
        await self._reaper.start()
        self._proc = await ModelProcess.spawn(run, full_env, cwd, self._append)
        self._reaper.watch(self._proc.pgid)
        return self._proc.pid

    def _append(self, stream: str, lines: list[str]) -> None:
        for line in lines:
            self._seq += 1
            self._lines.append((self._seq, stream, line))
        if self._news is not None:
            self._news.set()

    async def lines(self, after: int, wait: float) -> tuple[list[tuple[int, str, str]], bool]:
        """The output lines numbered above ``after``, waiting up to ``wait`` seconds for
        one; and whether no more will come (the engine stopped and its output is read)."""
        news = self._news
        if self._seq <= after and not self._closed and news is not None:
            news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(news.wait(), wait)
        return [item for item in self._lines if item[0] > after], self._closed

    async def wait(self) -> int:
        proc = self._proc
        if proc is None:
            raise RuntimeError("no engine was started")
        return await proc.wait()

    async def stop(self, grace: float) -> int:
        """SIGTERM to the group, SIGKILL after ``grace``; its exit code."""
        proc = self._proc
        if proc is None:
            return 0
        code = await proc.stop(grace)
        self._closed = True
        if self._news is not None:
            self._news.set()
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.forget(proc.pgid)
            await reaper.close()
        return code
