"""The manager's side of an engine on a cluster node: the runtime holds it as it holds a
local process (``EngineProcess``). Control goes through the node's ``EngineHost``
(cluster/actors.py); requests go straight to the engine's address, never through the
cluster."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Protocol

from llm_manager.errors import StartFailed
from llm_manager.models.process import LineSink

LOST_CODE = -1  # the exit code reported for an engine whose node left the cluster
POLL_WAIT = 1.0  # seconds a fetch of output lines waits on the node for a new one
STOP_EXTRA = 10.0  # beyond the stop's grace, how long the node may take to answer


class HostLost(Exception):
    """The engine's host is gone (its node left the cluster, or it was killed)."""


class HostCalls(Protocol):
    """The calls to one EngineHost, as coroutines; HostLost when it is gone."""

    async def free_port(self, host: str) -> int: ...

    async def start(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, script: bool
    ) -> int: ...

    async def lines(self, after: int, wait: float) -> tuple[list[tuple[int, str, str]], bool]: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float) -> int: ...

    async def keep(self, kept: object) -> None:
        """Leave with the host what its owner needs to adopt the engine again."""

    def discard(self) -> None:
        """End the host (and with it whatever it still runs)."""


class RemoteEngine:
    """One engine on a node. Methods must be called from the event loop."""

    def __init__(self, node: str, address: str, calls: HostCalls) -> None:
        self.node: str | None = node
        self.address = address
        self.pid = 0
        self.pgid = 0
        self.lost: str | None = None
        self._calls = calls
        self._code: int | None = None
        self._ended: asyncio.Future[int] | None = None
        self._pump: asyncio.Task[None] | None = None
        self._waiter: asyncio.Task[None] | None = None

    async def free_port(self) -> int:
        try:
            return await self._calls.free_port(self.address)
        except HostLost as exc:
            raise StartFailed(f"node {self.node} left the cluster: {exc}") from None

    async def start(
        self, argv: list[str], env: dict[str, str], cwd: str | None, script: bool, sink: LineSink
    ) -> None:
        """Spawn the engine on the node; its output goes to ``sink`` from now on."""
        try:
            self.pid = self.pgid = await self._calls.start(argv, env, cwd, script)
        except HostLost as exc:
            raise StartFailed(f"node {self.node} left the cluster: {exc}") from None
        except StartFailed:
            raise
        except Exception as exc:  # raised on the node: it says what went wrong there
            raise StartFailed(f"cannot start on node {self.node}: {_cause(exc)}") from None
        self._follow(sink, 0)

    def attach(self, pid: int, after: int, sink: LineSink) -> None:
        """Follow an engine its host started earlier (for an owner that was restarted):
        its output from line ``after`` on, and its end."""
        self.pid = self.pgid = pid
        self._follow(sink, after)

    async def keep(self, kept: object) -> None:
        with contextlib.suppress(HostLost):
            await self._calls.keep(kept)

    def _follow(self, sink: LineSink, after: int) -> None:
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._pump = asyncio.create_task(self._fetch(sink, after), name=f"output from {self.node}")
        self._waiter = asyncio.create_task(self._watch(), name=f"engine on {self.node}")

    @property
    def returncode(self) -> int | None:
        return self._code

    async def wait(self) -> int:
        ended = self._ended
        if ended is None:
            return self._code if self._code is not None else LOST_CODE
        return await asyncio.shield(ended)

    def describe_exit(self, code: int) -> str:
        if self.lost is not None:
            return f"ended: its node {self.node} left the cluster ({self.lost})"
        return f"exited with code {code} on node {self.node}"

    async def stop(self, grace: float) -> int:
        """The host's stop (SIGTERM, SIGKILL after ``grace``, grandchildren included); then
        the host itself ends. A host already gone has nothing left to stop."""
        code: int | None = None
        if self.lost is None:
            with contextlib.suppress(HostLost, TimeoutError):
                code = await asyncio.wait_for(self._calls.stop(grace), grace + STOP_EXTRA)
        if code is not None:
            self._set_code(code)
        await self.close()
        return self._code if self._code is not None else LOST_CODE

    async def close(self) -> None:
        """Read the output to its end (a moment at most), then end the host."""
        pump = self._pump
        if pump is not None and not pump.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pump), 2 * POLL_WAIT)
            pump.cancel()
        waiter = self._waiter
        if waiter is not None:
            waiter.cancel()
        if self._code is None:
            self._set_code(LOST_CODE)
        self._calls.discard()

    def discard(self) -> None:
        """A host given up before a start (the start failed before it spawned)."""
        self._calls.discard()

    def _set_code(self, code: int) -> None:
        if self._code is None:
            self._code = code
        ended = self._ended
        if ended is not None and not ended.done():
            ended.set_result(self._code)

    async def _watch(self) -> None:
        try:
            code = await self._calls.wait()
        except HostLost as exc:
            self.lost = str(exc) or "its host is gone"
            code = LOST_CODE
        self._set_code(code)

    async def _fetch(self, sink: LineSink, seq: int) -> None:
        while True:
            try:
                batch, done = await self._calls.lines(seq, POLL_WAIT)
            except HostLost:
                return
            run: list[str] = []  # consecutive lines of one stream: one call
            run_stream = ""
            for seq, stream, line in batch:  # noqa: B007 (seq: the last one fetched)
                if stream != run_stream and run:
                    sink(run_stream, run)
                    run = []
                run_stream = stream
                run.append(line)
            if run:
                sink(run_stream, run)
            if done and not batch:
                return


def _cause(exc: BaseException) -> str:
    """An error raised on a node as one line (Ray wraps it with its traceback)."""
    cause = getattr(exc, "cause", None) or exc
    message = getattr(cause, "message", None)
    return str(message) if message else str(cause).strip().splitlines()[-1]
