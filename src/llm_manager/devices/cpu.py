"""System memory and CPU through psutil."""

from __future__ import annotations

import psutil

from llm_manager.devices.base import Device, ProviderReport

_MIB = 1024 * 1024


class CpuProvider:
    name = "cpu"

    def probe(self) -> ProviderReport:
        try:
            mem = psutil.virtual_memory()
            count = psutil.cpu_count(logical=True) or 0
        except Exception as exc:  # a provider reports failure, never raises
            return ProviderReport(self.name, online=False, reason=f"psutil failed: {exc}")
        total = mem.total // _MIB
        # "available" is what a new process can take without swapping; "free" alone
        # ignores reclaimable page cache and would make every big model look too big.
        free = mem.available // _MIB
        device = Device(
            key="cpu",
            kind="cpu",
            name="cpu",
            memory_total=total,
            memory_used=total - free,
            memory_free=free,
            temperature=_cpu_temperature(),
        )
        info = {
            "cpu_count": count,
            "memory_total": total,
            "memory_used": total - free,
            "memory_free": free,
        }
        return ProviderReport(self.name, online=True, devices=(device,), info=info)


def _cpu_temperature() -> float | None:
    reader = getattr(psutil, "sensors_temperatures", None)
    if reader is None:
        return None
    try:
        sensors = reader()
    except Exception:
        return None
    for label in ("coretemp", "k10temp", "cpu_thermal", "zenpower"):
        entries = sensors.get(label)
        if entries:
            return float(entries[0].current)
    return None
