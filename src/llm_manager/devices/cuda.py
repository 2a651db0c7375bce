"""NVIDIA GPUs through NVML (nvidia-ml-py), with ``nvidia-smi`` CSV as the fallback.

Probes block (NVML calls, a subprocess): the monitor runs them in a thread. A GPU that
vanishes or an NVML error makes the report ``online: false`` with the reason; nothing
raises out of a probe.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time
from typing import Any

from llm_manager.devices.base import Device, ProviderReport

_MIB = 1024 * 1024


class CudaProvider:
    name = "cuda"

    def __init__(
        self, nvml: Any | None = None, smi: str | None = "nvidia-smi", retry_after: float = 60.0
    ) -> None:
        # ``nvml`` is injectable so that tests can stand in for the driver.
        self._nvml = nvml
        self._smi = smi
        self._initialised = False
        self._nvml_error: str | None = None
        self._retry_after = retry_after
        self._next_try = 0.0

    def probe(self) -> ProviderReport:
        nvml = self._load_nvml()
        if nvml is not None:
            try:
                return self._probe_nvml(nvml)
            except Exception as exc:
                # The driver went away or a GPU fell off the bus: re-initialise next time.
                self._initialised = False
                return ProviderReport(self.name, online=False, reason=f"NVML error: {exc}")
        return self._probe_smi()

    def _load_nvml(self) -> Any | None:
        if self._initialised:
            return self._nvml
        if time.monotonic() < self._next_try:
            return None  # a machine without NVML: do not retry on every poll
        try:
            if self._nvml is None:
                import pynvml  # type: ignore[import-untyped]

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no permission
            self._nvml_error = f"NVML unavailable: {exc}"
            self._next_try = time.monotonic() + self._retry_after
            return None
        self._initialised = True
        return self._nvml

    def _probe_nvml(self, nvml: Any) -> ProviderReport:
        devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                Device(
                    key=f"cuda:{index}",
                    kind="cuda",
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    index=index,
                    uuid=_optional(lambda h=handle: _text(nvml.nvmlDeviceGetUUID(h))),
                    memory_total=memory.total // _MIB,
                    memory_used=memory.used // _MIB,
                    memory_free=memory.free // _MIB,
                    temperature=_optional(
                        lambda h=handle: float(
                            nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
                        )
                    ),
                    utilization=_optional(
                        lambda h=handle: float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
                    ),
                    processes=_nvml_processes(nvml, handle),
                )
            )
        return ProviderReport(
            self.name,
            online=bool(devices),
            devices=tuple(devices),
            reason=None if devices else "NVML reports no GPU",
            info={"source": "nvml"},
        )

    def _probe_smi(self) -> ProviderReport:
        exe = shutil.which(self._smi) if self._smi else None
        if exe is None:
            reason = self._nvml_error or "NVML unavailable"
            return ProviderReport(self.name, online=False, reason=f"{reason}; no nvidia-smi")
        try:
            gpus = _run(
                exe,
                "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free,"
                "temperature.gpu,utilization.gpu",
            )
            apps = _run(exe, "--query-compute-apps=gpu_uuid,pid,used_memory")
        except (OSError, subprocess.SubprocessError) as exc:
            return ProviderReport(self.name, online=False, reason=f"nvidia-smi failed: {exc}")
        by_uuid: dict[str, list[tuple[int, int]]] = {}
        for row in apps:
            if len(row) >= 3 and row[1].isdigit():
                by_uuid.setdefault(row[0], []).append((int(row[1]), _int(row[2]) or 0))
        devices = []
        for row in gpus:
            if len(row) < 8 or not row[0].isdigit():
                continue
            index = int(row[0])
            devices.append(
                Device(
                    key=f"cuda:{index}",
                    kind="cuda",
                    name=row[2],
                    index=index,
                    uuid=row[1],
                    memory_total=_int(row[3]) or 0,
                    memory_used=_int(row[4]) or 0,
                    memory_free=_int(row[5]) or 0,
                    temperature=_float(row[6]),
                    utilization=_float(row[7]),
                    processes=tuple(by_uuid.get(row[1], ())),
                )
            )
        return ProviderReport(
            self.name,
            online=bool(devices),
            devices=tuple(devices),
            reason=None if devices else "nvidia-smi reports no GPU",
            info={"source": "nvidia-smi"},
        )


def _nvml_processes(nvml: Any, handle: Any) -> tuple[tuple[int, int], ...]:
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return ()
    out = []
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        # NVML reports "not available" as a huge sentinel (or None) inside containers.
        mib = used // _MIB if isinstance(used, int) and 0 <= used < (1 << 50) else 0
        out.append((int(p.pid), mib))
    return tuple(out)


def _run(exe: str, query: str) -> list[list[str]]:
    done = subprocess.run(
        [exe, query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return [[c.strip() for c in row] for row in csv.reader(io.StringIO(done.stdout)) if row]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(read: Any) -> Any:
    try:
        return read()
    except Exception:  # a reading a GPU does not support (temperature on some vGPUs)
        return None


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None
