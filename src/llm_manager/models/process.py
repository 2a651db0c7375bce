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
from typing import Protocol, cast

import psutil

# (stream, lines): the complete lines of one read, in order. A list, not a call per line:
# llama.cpp prints about ten lines per request, and each call down to the store cost about
# as much as the line itself (measured, docs/performance.md).
LineSink = Callable[[str, list[str]], None]


class EngineProcess(Protocol):
    """What the runtime holds of a running engine: a ModelProcess here, or a cluster
    engine on another node (cluster/remote.py)."""

    pid: int
    pgid: int
    node: str | None  # None: on this machine (its PID can be read and signalled here)
    lost: str | None

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def stop(self, grace: float) -> int: ...

    async def close(self) -> None: ...

    def describe_exit(self, code: int) -> str: ...


MAX_LINE_BYTES = 16 * 1024
_TRUNCATED = " …[truncated]"
_PR_SET_PDEATHSIG = 1
COALESCE = 0.02  # seconds a trickle of output waits so that lines are read together
TRICKLE_BYTES = 4096  # a read smaller than this is a trickle


def dies_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: on Linux the child gets SIGKILL when its parent (``parent_pid``, the
    thread that spawns it) ends, however it ends."""

    # Loaded here, in the parent: the child between fork and exec does only async-signal-
    # safe work (dlopen is not).
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

    def setup() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent_pid:  # the parent died before prctl took effect
                os._exit(1)

    return setup


class ModelProcess:
    """One spawned process group. Methods must be called from the event loop."""

    node: str | None = None  # on this machine; a cluster engine (cluster/remote.py) is not
    lost: str | None = None  # a cluster engine's node that left: why it ended

    def __init__(self, proc: asyncio.subprocess.Process, readers: list[_OutputReader]) -> None:
        self._proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own group
        self.started_at = time.time()
        self._readers = readers

    @classmethod
    async def spawn(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        sink: LineSink,
    ) -> ModelProcess:
        # Our own pipes, read by protocols (not StreamReaders): their reading can be paused
        # to gather a trickle of lines into one wake-up (see _OutputReader).
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                preexec_fn=dies_with_parent(os.getpid()),
            )
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        loop = asyncio.get_running_loop()
        readers = []
        for fd, name in ((out_r, "stdout"), (err_r, "stderr")):
            reader = _OutputReader(name, sink, loop)
            await loop.connect_read_pipe(lambda r=reader: r, os.fdopen(fd, "rb", buffering=0))  # type: ignore[misc]
            readers.append(reader)
        return cls(proc, readers)

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def describe_exit(self, code: int) -> str:
        return f"exited with code {code}"

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
        # A grandchild may still hold the pipes open: give the readers a moment, then stop.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(r.done for r in self._readers)), 1.0)
        for reader in self._readers:
            reader.close()


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


class _OutputReader(asyncio.Protocol):
    """Reads one output pipe of a model and hands every complete line to the sink.

    Engines print a few short lines per request (llama.cpp about ten), each its own write,
    and waking up for each one cost the manager about half a millisecond of CPU per
    request. So after a small read (a trickle) reading pauses for COALESCE seconds and the
    next lines arrive together; after a large read (a flood) it goes on at once, so that a
    model printing a lot never waits on a full pipe.
    """

    def __init__(self, name: str, sink: LineSink, loop: asyncio.AbstractEventLoop) -> None:
        self._lines = _LineSplitter(name, sink)
        self._loop = loop
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False
        self._closed = False
        self.done: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.ReadTransport, transport)

    def data_received(self, data: bytes) -> None:
        self._lines.feed(data)
        if len(data) < TRICKLE_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
            self._loop.call_later(COALESCE, self._resume)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lines.finish()
        if not self.done.done():
            self.done.set_result(None)

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()

    def _resume(self) -> None:
        self._paused = False
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()


class _LineSplitter:
    """Bytes in, lines out: the complete lines of each read go to the sink in one call.
    Invalid UTF-8 becomes replacement characters; very long lines are cut with a marker."""

    def __init__(self, name: str, sink: LineSink) -> None:
        self._name = name
        self._sink = sink
        self._buffer = bytearray()
        self._dropping = False  # inside an over-long line whose head was already emitted

    def feed(self, chunk: bytes) -> None:
        buffer = self._buffer
        if buffer:
            buffer += chunk
            chunk = bytes(buffer)
            buffer.clear()
        end = chunk.rfind(b"\n")
        if end >= 0:
            start = 0
            if self._dropping:  # the first line is the rest of an over-long line sent
                self._dropping = False
                start = chunk.find(b"\n") + 1
            if start <= end:
                self._sink(self._name, _lines(chunk[start:end]))
            rest = chunk[end + 1 :]
        else:
            rest = chunk
        if len(rest) > MAX_LINE_BYTES:
            if not self._dropping:
                self._sink(self._name, [_decode(rest[:MAX_LINE_BYTES]) + _TRUNCATED])
            self._dropping = True
        elif not self._dropping:
            buffer += rest

    def finish(self) -> None:
        if self._buffer and not self._dropping:
            self._sink(self._name, [_decode(bytes(self._buffer))])
        self._buffer.clear()


def _lines(data: bytes) -> list[str]:
    """The lines of ``data`` (complete lines without the last line break)."""
    if len(data) <= MAX_LINE_BYTES:
        # No line can be too long: decoded at once (a line break never falls inside a
        # UTF-8 sequence, so this gives what decoding line by line gives), then split.
        text = data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        if text.find("\r") >= 0:
            lines = [line.rstrip("\r") for line in lines]
        return lines
    return [
        _decode(line[:MAX_LINE_BYTES]) + _TRUNCATED if len(line) > MAX_LINE_BYTES else _decode(line)
        for line in data.split(b"\n")
    ]


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").rstrip("\r")


async def run_command(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str | None,
    sink: LineSink,
    timeout: float,
) -> int | None:
    """Run a short command (a hook, a stop command) in its own process group, its output
    to ``sink``; returns its exit code, or None when it ran past ``timeout`` and its whole
    group was killed. Cancelled, it kills the group too."""
    proc = await ModelProcess.spawn(argv, env, cwd, sink)
    try:
        code = await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
    except TimeoutError:
        await proc.stop(0)
        return None
    except asyncio.CancelledError:
        await asyncio.shield(proc.stop(0))
        raise
    # Whatever it left in its group (a forked helper) goes with it.
    await proc.stop(0)
    return code
