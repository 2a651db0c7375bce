"""Per-model log: a bounded in-memory ring of output lines and lifecycle events.

Appending never blocks and never fails: the process drain calls it for every line.
(Persistence, live subscribers and retention come with the logs feature; see issue 4.)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger("llm_manager.model")


@dataclass(frozen=True)
class LogLine:
    timestamp: float
    stream: str  # stdout | stderr | manager
    message: str


class ModelLog:
    """Owned by one model's runtime; readers take copies."""

    def __init__(self, model: str, capacity: int = 5000) -> None:
        self.model = model
        self._lines: deque[LogLine] = deque(maxlen=capacity)

    def append(self, stream: str, message: str) -> None:
        self._lines.append(LogLine(time.time(), stream, message))

    def event(self, message: str) -> None:
        """A lifecycle event of the manager's about this model (also to the manager's log)."""
        log.info("%s: %s", self.model, message)
        self.append("manager", message)

    def lines(self) -> list[LogLine]:
        return list(self._lines)

    def __len__(self) -> int:
        return len(self._lines)
