"""Model logs: a bounded ring of lines per model, live subscribers, and persistence.

Appending never blocks and never fails: the process drain calls it for every line. A
subscriber has a bounded buffer; when it falls behind, further lines are dropped for it
and counted, and it is told how many it skipped. Nothing a reader does slows a model.

Concurrency rule: everything here runs on the event loop thread, so taking a snapshot
and subscribing happen in one step, and the seam between history and live lines is exact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from llm_manager.errors import StorageUnavailable
from llm_manager.loglevel import INFO, LEVELS, StreamLevels

if TYPE_CHECKING:
    from llm_manager.config import ServerConfig

log = logging.getLogger("llm_manager.model")

Persist = Callable[[str, float, str, list[str]], None]  # (model, timestamp, stream, messages)


class LogLine(NamedTuple):
    """One line, immutable. A named tuple, not a frozen dataclass: every line a model
    prints makes one, and a frozen dataclass took 0.63 us to build, this 0.26 us."""

    seq: int
    timestamp: float
    stream: str  # stdout | stderr | manager
    message: str
    # error | warning | info, read from the message (loglevel.py), never from the stream:
    # llama.cpp writes everything to stderr.
    level: str = INFO


_new_tuple = tuple.__new__


class Subscription:
    """One live reader. ``get`` returns what arrived since the last call, at once."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lines: deque[LogLine] = deque()
        self._ready = asyncio.Event()
        self.skipped = 0
        self.closed = False

    def offer(self, line: LogLine) -> None:
        if len(self._lines) >= self._limit:
            self.skipped += 1  # a slow reader loses lines, the model never waits
            return
        self._lines.append(line)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self) -> tuple[int, list[LogLine]]:
        """(lines skipped since the last call, new lines); ([], 0) once closed and empty."""
        await self._ready.wait()
        self._ready.clear()
        lines = list(self._lines)
        self._lines.clear()
        skipped, self.skipped = self.skipped, 0
        return skipped, lines


class ModelLog:
    """Owned by one model's runtime; the log book keeps them all."""

    def __init__(
        self,
        model: str,
        capacity: int,
        persist: Persist | None = None,
        subscriber_limit: int = 10_000,
    ) -> None:
        self.model = model
        self._lines: deque[LogLine] = deque(maxlen=capacity)
        self._persist = persist
        self._subscribers: set[Subscription] = set()
        self._subscriber_limit = subscriber_limit
        self._seq = 0
        self._levels = StreamLevels()

    def append(self, stream: str, message: str) -> None:
        self.extend(stream, [message])

    def extend(self, stream: str, messages: list[str]) -> None:
        """The lines of one read of a model's output: kept, stored and sent on together,
        with one timestamp (they arrived together)."""
        now = time.time()
        seq = self._seq
        lines = []
        for message, level in zip(messages, self._levels.levels(stream, messages), strict=True):
            seq += 1
            # tuple.__new__, not LogLine(...): the named tuple's __new__ is a Python frame
            lines.append(_new_tuple(LogLine, (seq, now, stream, message, level)))
        self._seq = seq
        self._lines.extend(lines)
        if self._persist is not None:
            self._persist(self.model, now, stream, messages)
        for subscriber in self._subscribers:
            for line in lines:
                subscriber.offer(line)

    def copy(self, timestamp: float, stream: str, message: str, level: str) -> None:
        """A line another process logged and keeps (a gateway replica shows the lines of
        the controller that runs the model): shown and streamed here, not stored again."""
        self._seq += 1
        line = LogLine(self._seq, timestamp, stream, message, level)
        self._lines.append(line)
        for subscriber in self._subscribers:
            subscriber.offer(line)

    def event(self, message: str) -> None:
        """A lifecycle event of the manager's about this model (also to the manager's log)."""
        log.info("%s: %s", self.model, message)
        self.append("manager", message)

    def load(self, lines: list[tuple[float, str, str]]) -> None:
        """History from an earlier run, before anything new is appended."""
        levels = StreamLevels()  # an earlier run's tracebacks are its own
        for timestamp, stream, message in lines:
            self._seq += 1
            level = levels.level(stream, message)
            self._lines.append(LogLine(self._seq, timestamp, stream, message, level))

    def lines(self) -> list[LogLine]:
        return list(self._lines)

    @property
    def last_seq(self) -> int:
        """The number of the latest line (0 before any): a mark for ``lines_after``."""
        return self._seq

    def lines_after(self, seq: int) -> list[LogLine]:
        """The lines kept in memory that came after the mark ``seq``."""
        return [line for line in self._lines if line.seq > seq]

    def subscribe(self) -> tuple[list[LogLine], Subscription]:
        """The history now, and every line after it: nothing lost or repeated between."""
        subscription = Subscription(self._subscriber_limit)
        self._subscribers.add(subscription)
        return list(self._lines), subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close_subscribers(self) -> None:
        for subscription in self._subscribers:
            subscription.close()
        self._subscribers.clear()

    def forget_before(self, cutoff: float) -> int:
        """Drop lines older than ``cutoff`` from memory; returns how many."""
        kept = [line for line in self._lines if line.timestamp >= cutoff]
        removed = len(self._lines) - len(kept)
        self._lines.clear()
        self._lines.extend(kept)
        return removed

    def level_counts(self) -> dict[str, int]:
        """Lines kept in memory per level (every level present, 0 where none)."""
        counts = dict.fromkeys(LEVELS, 0)
        for line in self._lines:
            counts[line.level] += 1
        return counts

    def __len__(self) -> int:
        return len(self._lines)


@dataclass(frozen=True)
class LogSettings:
    buffer_lines: int  # per model, in memory
    retention: float  # seconds; 0 = keep forever
    max_lines: int  # per model, in SQLite; 0 = no limit

    @classmethod
    def of(cls, server: ServerConfig) -> LogSettings:
        return cls(server.log_buffer_lines, server.log_retention, server.log_max_lines)


class LogBook:
    """Every model's log, their persistence, and the retention schedule."""

    def __init__(self, store: LogStoreLike | None, settings: LogSettings) -> None:
        self._store = store
        self.settings = settings
        self._logs: dict[str, ModelLog] = {}

    def create(self, model: str) -> ModelLog:
        persist = self._store.add_lines if self._store is not None else None
        self._logs[model] = ModelLog(model, self.settings.buffer_lines, persist)
        return self._logs[model]

    def get(self, model: str) -> ModelLog:
        return self._logs[model]

    def has(self, model: str) -> bool:
        return model in self._logs

    async def load(self) -> None:
        """Fill each ring with the newest lines kept from earlier runs."""
        if self._store is None:
            return
        # A copy: a reload (SIGHUP) during the start may add a model while this awaits.
        for name, model_log in list(self._logs.items()):
            try:
                lines = await asyncio.to_thread(
                    self._store.recent, name, self.settings.buffer_lines
                )
            except Exception as exc:  # an unreadable database loses history, not the start
                log.error("cannot read the stored log of %s: %s", name, exc)
                continue
            model_log.load(lines)

    async def clear(self, model: str, keep_minutes: float) -> int:
        """Delete a model's lines older than ``keep_minutes`` (0 = all): memory and SQLite."""
        cutoff = time.time() - keep_minutes * 60 if keep_minutes > 0 else float("inf")
        in_memory = self._logs[model].forget_before(cutoff)
        if self._store is None:
            return in_memory
        try:
            return await self._store.delete_before(model, cutoff)
        except StorageUnavailable as exc:  # memory was cleared; say what was
            log.warning("stored log of %s not cleared: %s", model, exc.detail)
            return in_memory

    async def counts(self) -> dict[str, int]:
        """Stored lines per model (what clear deletes); the in-memory ones without storage."""
        if self._store is not None:
            try:
                return await asyncio.to_thread(self._store.counts)
            except StorageUnavailable:
                pass
        return {name: len(lg) for name, lg in self._logs.items()}

    def level_counts(self) -> dict[str, dict[str, int]]:
        """Per model, the in-memory lines per level (error, warning, info): what the log
        statistics count as errors and warnings, read from each line's content."""
        return {name: model_log.level_counts() for name, model_log in self._logs.items()}

    async def retention_loop(self, interval: float = 60.0) -> None:
        settings = self.settings
        if self._store is None or (settings.retention <= 0 and settings.max_lines <= 0):
            return
        while True:
            try:
                removed = await self._store.apply_retention(settings.retention, settings.max_lines)
                if removed:
                    log.debug("log retention removed %d line(s)", removed)
            except Exception as exc:  # a failed prune is retried at the next interval
                log.error("log retention failed: %s", exc)
            await asyncio.sleep(interval)

    def close_subscribers(self) -> None:
        for model_log in self._logs.values():
            model_log.close_subscribers()


class LogStoreLike(Protocol):
    def add_lines(self, model: str, ts: float, stream: str, messages: list[str]) -> None: ...

    def recent(self, model: str, limit: int) -> list[tuple[float, str, str]]: ...

    def counts(self) -> dict[str, int]: ...

    async def delete_before(self, model: str, cutoff: float) -> int: ...

    async def apply_retention(self, max_age: float, max_lines: int) -> int: ...
