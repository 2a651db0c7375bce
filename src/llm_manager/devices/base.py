"""What every device provider reports, and the protocol a provider implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Device:
    """One device as last seen. Memory in MiB.

    ``measured`` says whether ``memory_free`` is a reading (probed hardware) or derived
    from the declared total (declared devices), which decides how reservations apply.
    """

    key: str  # stable id: "cpu", "cuda:0", "static:rtx 4060"
    kind: str  # cuda | amd | cpu | other
    name: str
    memory_total: int
    memory_used: int
    memory_free: int
    index: int | None = None
    temperature: float | None = None
    online: bool = True
    measured: bool = True
    uuid: str | None = None
    utilization: float | None = None  # percent busy
    processes: tuple[tuple[int, int], ...] = ()  # (pid, MiB) of compute processes
    # Cluster mode: the node the device is on (its key is then "NODE/KEY"); None = this
    # machine.
    node: str | None = None


@dataclass(frozen=True)
class ProviderReport:
    """A provider's whole answer. A failed probe is ``online=False`` with a ``reason``."""

    provider: str  # "cpu", "cuda", "static"...
    online: bool
    devices: tuple[Device, ...] = ()
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class DeviceProvider(Protocol):
    """Probes one family of devices. ``probe`` may block; callers run it in a thread."""

    name: str

    def probe(self) -> ProviderReport: ...
