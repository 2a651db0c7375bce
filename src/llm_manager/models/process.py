"""Spawning a model process in its own process group, capturing its output, stopping it.

The process gets its own session (so a signal to the group reaches every child it
forked, and the terminal's Ctrl-C does not reach it directly) and, on Linux, the
parent-death signal SIGKILL so that a killed manager does not leave it behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import psutil

LineSink = Callable[[str, str], None]  # (stream, line)

MAX_LINE_BYTES = 16 * 1024
_TRUNCATED = " …[truncated]"
_PR_SET_PDEATHSIG = 1


def _child_setup(parent_pid: int) -> Callable[[], None]:
    def setup() -> None:
        # Runs in the child between fork and exec: only async-signal-safe work here.
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return setup


class ModelProcess:
    """One spawned process group. Methods must be called from the event loop."""

    def __init__(self, proc: asyncio.subprocess.Process, sink: LineSink) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own group
        self.started_at = time.time()
        self._drains = [
            asyncio.create_task(_drain(proc.stdout, "stdout", sink)),
            asyncio.create_task(_drain(proc.stderr, "stderr", sink)),
        ]

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        sink: LineSink,
    ) -> ModelProcess:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_child_setup(os.getpid()),
        )
        return cls(proc, sink)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def stop(self, grace: float) -> int:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds; returns the exit code.

        Descendants that left the group (setsid) are found through the process tree
        taken before signalling, and killed too.
        """
        descendants = _descendants(self.pid)
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if self.returncode is not None and not _alive(self.pgid, descendants):
                break
            await asyncio.sleep(0.05)
        if self.returncode is None or _alive(self.pgid, descendants):
            _signal_group(self.pgid, signal.SIGKILL)
            for p in descendants:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        code = await self._proc.wait()
        await self.close()
        return code

    async def close(self) -> None:
        """Finish capturing output; called once the process is gone."""
        # A grandchild may still hold the pipes open: give the drains a moment, then stop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._drains, return_exceptions=True), 1.0)
        for task in self._drains:
            task.cancel()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(pgid: int, descendants: Sequence[psutil.Process]) -> bool:
    """Any non-zombie process left in the group or among the recorded descendants."""
    try:
        os.killpg(pgid, 0)
        group_exists = True
    except (ProcessLookupError, PermissionError):
        group_exists = False
    if group_exists and group_members(pgid):
        return True
    return any(_running(p) for p in descendants)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in a process group."""
    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


async def _drain(stream: asyncio.StreamReader | None, name: str, sink: LineSink) -> None:
    """Read output continuously, one line at a time, never blocking on the sink.

    Invalid UTF-8 becomes replacement characters; very long lines are cut with a marker.
    """
    if stream is None:
        return
    buffer = bytearray()
    dropping = False  # inside an over-long line whose head was already emitted
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > MAX_LINE_BYTES:
                    if not dropping:
                        sink(name, _decode(buffer[:MAX_LINE_BYTES]) + _TRUNCATED)
                    dropping = True
                    buffer.clear()
                break
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            if dropping:
                dropping = False
                continue
            if len(line) > MAX_LINE_BYTES:
                sink(name, _decode(line[:MAX_LINE_BYTES]) + _TRUNCATED)
            else:
                sink(name, _decode(line))
    if buffer and not dropping:
        sink(name, _decode(bytes(buffer)))


def _decode(data: bytes | bytearray) -> str:
    return bytes(data).decode("utf-8", errors="replace").rstrip("\r")
