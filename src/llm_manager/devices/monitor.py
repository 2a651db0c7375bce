"""The set of device providers, probed in a thread and cached for a poll interval."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from llm_manager.devices.base import Device, DeviceProvider, ProviderReport


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    reports: tuple[ProviderReport, ...]

    @property
    def devices(self) -> list[Device]:
        return [d for r in self.reports if r.online for d in r.devices]


class DeviceMonitor:
    """Owns the latest device snapshot. Probes never run on the event loop, and
    concurrent callers share one probe (single flight)."""

    def __init__(self, providers: Sequence[DeviceProvider], poll_interval: float = 2.0) -> None:
        self._providers = tuple(providers)
        self._poll_interval = poll_interval
        self._latest: Snapshot | None = None
        self._probing: asyncio.Task[Snapshot] | None = None

    def replace(self, name: str, provider: DeviceProvider | None) -> None:
        """Swap (or add, or with None remove) the provider of that name; read afresh."""
        kept = [p for p in self._providers if p.name != name]
        self._providers = tuple(kept + ([provider] if provider is not None else []))
        self._latest = None

    def invalidate(self) -> None:
        """The next snapshot is read afresh (a cluster node left)."""
        self._latest = None

    @property
    def latest(self) -> Snapshot | None:
        return self._latest

    async def snapshot(self, max_age: float | None = None) -> Snapshot:
        age_limit = self._poll_interval if max_age is None else max_age
        latest = self._latest
        if latest is not None and time.monotonic() - latest.taken_at <= age_limit:
            return latest
        if self._probing is None:
            self._probing = asyncio.create_task(asyncio.to_thread(self._probe_all))
            self._probing.add_done_callback(self._probe_done)
        return await asyncio.shield(self._probing)

    def _probe_done(self, task: asyncio.Task[Snapshot]) -> None:
        self._probing = None
        if not task.cancelled() and task.exception() is None:
            self._latest = task.result()

    def _probe_all(self) -> Snapshot:
        return Snapshot(time.monotonic(), probe_all(self._providers))


def probe_all(providers: Sequence[DeviceProvider]) -> tuple[ProviderReport, ...]:
    """Every provider's report (blocks); a provider that raises is reported offline."""
    reports = []
    for provider in providers:
        try:
            reports.append(provider.probe())
        except Exception as exc:  # a broken provider is reported, never raised
            reports.append(ProviderReport(provider.name, online=False, reason=repr(exc)))
    return tuple(reports)
