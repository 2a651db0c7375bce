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

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "llm_manager.models.reaper",
            stdin=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            proc.stdin.write(line.encode() + b"\n")

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def forget(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    async def close(self) -> None:
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
