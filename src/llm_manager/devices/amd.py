"""AMD GPUs through Linux sysfs (amdgpu): VRAM from ``mem_info_vram_*``, hwmon temperature."""

from __future__ import annotations

from pathlib import Path

from llm_manager.devices.base import Device, ProviderReport

_MIB = 1024 * 1024


class AmdProvider:
    name = "amd"

    def __init__(self, drm: Path = Path("/sys/class/drm")) -> None:
        self._drm = drm

    def present(self) -> bool:
        return any(self._cards())

    def _cards(self) -> list[Path]:
        try:
            cards = sorted(self._drm.glob("card[0-9]*"))
        except OSError:
            return []
        return [c for c in cards if (c / "device" / "mem_info_vram_total").exists()]

    def probe(self) -> ProviderReport:
        devices = []
        for index, card in enumerate(self._cards()):
            dev = card / "device"
            try:
                total = int((dev / "mem_info_vram_total").read_text()) // _MIB
                used = int((dev / "mem_info_vram_used").read_text()) // _MIB
            except (OSError, ValueError) as exc:
                return ProviderReport(self.name, online=False, reason=f"{card.name}: {exc}")
            devices.append(
                Device(
                    key=f"amd:{index}",
                    kind="amd",
                    name=_read(dev / "product_name") or f"AMD GPU ({card.name})",
                    index=index,
                    memory_total=total,
                    memory_used=used,
                    memory_free=max(0, total - used),
                    temperature=_temperature(dev),
                    utilization=_number(dev / "gpu_busy_percent"),
                )
            )
        if not devices:
            return ProviderReport(self.name, online=False, reason="no amdgpu device in sysfs")
        return ProviderReport(self.name, online=True, devices=tuple(devices))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _temperature(dev: Path) -> float | None:
    for sensor in sorted(dev.glob("hwmon/hwmon*/temp1_input")):
        value = _number(sensor)
        if value is not None:
            return value / 1000  # millidegrees
    return None
