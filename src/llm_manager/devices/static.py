"""Devices declared in the config (``devices:``): hardware that cannot be probed."""

from __future__ import annotations

from collections.abc import Sequence

from llm_manager.config import DeviceConfig
from llm_manager.devices.base import Device, ProviderReport


class StaticProvider:
    """Reports the declared devices as they are; their free memory is derived from the
    claims of the models placed on them (see scheduler), not measured."""

    name = "static"

    def __init__(self, declared: Sequence[DeviceConfig]) -> None:
        self._devices = tuple(
            Device(
                key=f"static:{d.name}",
                kind=d.kind,
                name=d.name,
                memory_total=d.memory_total_mib,
                memory_used=0,
                memory_free=d.memory_total_mib,
                index=d.index,
                online=d.online,
                measured=False,
            )
            for d in declared
        )

    def probe(self) -> ProviderReport:
        return ProviderReport(self.name, online=bool(self._devices), devices=self._devices)
