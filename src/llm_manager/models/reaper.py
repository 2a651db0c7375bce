"""A watchdog process that kills model process groups when the manager dies.

The parent-death signal reaches only a model's direct child; a model started through
a script (or a server that forks workers) has grandchildren it does not cover. The
reaper reads ``+PGID`` / ``-PGID`` lines on stdin; when stdin closes (the manager
exited, however it died) it SIGKILLs every group still registered.

Run as ``python -m llm_manager.models.reaper``; ``Reaper`` is the manager's handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if "--detach" in sys.argv[1:] and os.fork() > 0:
        # Not a child of whoever started it: a Ray worker's children are killed with the
        # worker (before a reaper could act); this process keeps reading the same stdin.
        os._exit(0)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        with contextlib.suppress(ValueError):
            if line.startswith("+"):
                groups.add(int(line[1:]))
            elif line.startswith("-"):
                groups.discard(int(line[1:]))
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


class Reaper:
    """The manager's side: one reaper process for the manager's lifetime."""

    def __init__(self, detached: bool = False) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._detached = detached  # see main(): for cluster engine hosts
        self._fd: int | None = None  # a detached reaper's stdin (the pipe's write end)

    async def start(self) -> None:
        argv = [sys.executable, "-m", "llm_manager.models.reaper"]
        if self._detached:
            # A pipe of our own: asyncio closes a process's stdin once the process exits,
            # and the process started here exits at once (its fork goes on reading).
            read, write = os.pipe()
            try:
                starter = await asyncio.create_subprocess_exec(
                    *argv, "--detach", stdin=read, start_new_session=True
                )
                await starter.wait()
            except BaseException:
                os.close(write)
                raise
            finally:
                os.close(read)
            self._fd = write
            return
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, start_new_session=True
        )

    def _send(self, line: str) -> None:
        data = line.encode() + b"\n"
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._fd, data)  # a few bytes: never blocks on a pipe
            return
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(data)

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the detached reaper reads the end and exits
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


if __name__ == "__main__":
    main()
