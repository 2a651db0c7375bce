"""Per-model concurrency limit with a bounded FIFO queue (``max_concurrency``)."""

from __future__ import annotations

import asyncio
from collections import deque

from llm_manager.errors import QueueFull


class ConcurrencyGate:
    """At most ``limit`` holders at once (0 = unlimited); up to ``queue`` more wait in
    arrival order; a waiter whose client leaves (its task is cancelled) leaves the queue."""

    def __init__(self, name: str, limit: int, queue: int) -> None:
        self.name = name
        self.limit = limit
        self.queue = queue
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot now if one is free and nobody waits (the common case, no await)."""
        if not self.limit:
            return True
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        if len(self._waiters) >= self.queue:
            raise QueueFull(
                f"model {self.name!r} is busy: {self.active} running, "
                f"{len(self._waiters)} queued (max_concurrency {self.limit})"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as the client left
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        if not self.limit:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes directly to the next in line
                return
        self.active -= 1
