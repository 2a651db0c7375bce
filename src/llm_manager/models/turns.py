"""The queue of model starts that wait for room, and the turns it gives loaded models.

Pure bookkeeping owned by the supervisor (event loop thread only); the rules it serves are
in ``design.md`` beside this file. A start that needs other models evicted is a ``Wait``
ranked by priority (higher first), then arrival. A wait may only evict models that no
wait ranked ahead of it plans to evict (they are *reserved*). A loaded model that a wait
plans to evict gets a turn end: ``turn_time`` after the later of the wait's arrival and
the model becoming ready; past it the model takes no new requests.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(eq=False)
class Wait:
    model: str
    priority: int
    since: float
    deadline: float
    seq: int
    victims: frozenset[str] = field(default_factory=frozenset)  # the models it plans to evict

    def rank(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class Turns:
    def __init__(self) -> None:
        self._waits: list[Wait] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    @property
    def waits(self) -> list[Wait]:
        return sorted(self._waits, key=Wait.rank)

    def enter(self, model: str, priority: int, timeout: float) -> Wait:
        now = time.monotonic()
        wait = Wait(model, priority, now, now + timeout, next(self._seq))
        self._waits.append(wait)
        return wait

    def leave(self, wait: Wait) -> None:
        if wait in self._waits:
            self._waits.remove(wait)
            self.notify()  # a model it had reserved may now be taken by the next one

    # --- waking -------------------------------------------------------------------------------

    def changed_event(self) -> asyncio.Event:
        """The event the next change sets. Take it *before* looking at the state, so that a
        change between the look and the wait is not missed."""
        return self._changed

    def notify(self) -> None:
        if not self._waits:
            return  # the common case on the request path: nobody waits, nothing to do
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # --- ranking ------------------------------------------------------------------------------

    def _ahead(self, wait: Wait) -> list[Wait]:
        return [w for w in self._waits if w is not wait and w.rank() < wait.rank()]

    def reserved_before(self, wait: Wait) -> frozenset[str]:
        """Models that waits ranked ahead of ``wait`` plan to evict."""
        out: set[str] = set()
        for w in self._ahead(wait):
            out |= w.victims
        return frozenset(out)

    def ahead_of(self, wait: Wait, victims: Iterable[str]) -> set[str]:
        """The models of the waits ranked ahead that plan to evict any of ``victims``."""
        wanted = set(victims)
        return {w.model for w in self._ahead(wait) if w.victims & wanted}

    def waiting_on(self, model: str) -> list[str]:
        return [w.model for w in self.waits if model in w.victims]

    def turn_ends(self, ready: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """For each ready model (name -> (ready since, turn_time)) that some wait plans to
        evict: when its turn ends."""
        ends: dict[str, float] = {}
        for w in self._waits:
            for name in w.victims:
                if name in ready:
                    ready_at, turn = ready[name]
                    end = max(w.since, ready_at) + turn
                    ends[name] = min(end, ends.get(name, end))
        return ends
