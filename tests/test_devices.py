"""Device providers against stand-ins for the driver (a fake NVML module, a fake nvidia-smi,
a fake sysfs tree), and /api/devices/info with real model processes."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llm_manager.devices.amd import AmdProvider
from llm_manager.devices.cpu import CpuProvider
from llm_manager.devices.cuda import CudaProvider
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.models.runtime import State
from tests.conftest import fake_command, make_config, running_manager, wait_until
from tests.test_server_process import launch

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


class FakeNvml:
    """The parts of pynvml the provider uses, over a list of GPUs the test edits."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus
        self.inits = 0
        self.fail_init = False
        self.lost = False  # the GPU fell off the bus

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        self.inits += 1
        if self.fail_init:
            raise NVMLError("Driver Not Loaded")

    def _check(self) -> None:
        if self.lost:
            raise NVMLError("GPU is lost")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        self._check()
        return index

    def nvmlDeviceGetName(self, h: int) -> bytes:  # noqa: N802
        return str(self.gpus[h]["name"]).encode()

    def nvmlDeviceGetUUID(self, h: int) -> str:  # noqa: N802
        return f"GPU-{h}"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:  # noqa: N802
        self._check()
        g = self.gpus[h]
        return SimpleNamespace(
            total=g["total"] * MIB, used=g["used"] * MIB, free=(g["total"] - g["used"]) * MIB
        )

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:  # noqa: N802
        if "temp" not in self.gpus[h]:
            raise NVMLError("Not Supported")
        return int(self.gpus[h]["temp"])

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:  # noqa: N802
        return SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:  # noqa: N802
        return [SimpleNamespace(pid=p, usedGpuMemory=m * MIB) for p, m in self.gpus[h]["procs"]]


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            {
                "name": "NVIDIA GeForce RTX 4060",
                "total": 8188,
                "used": 1000,
                "temp": 51,
                "procs": [],
            },
            {"name": "Tesla V100-SXM2-16GB", "total": 16384, "used": 0, "procs": [(4242, 1542)]},
        ]
    )


def test_nvml_readings() -> None:
    report = CudaProvider(nvml=two_gpus(), smi=None).probe()
    assert report.online and report.info == {"source": "nvml"}
    rtx, v100 = report.devices
    assert (rtx.key, rtx.index, rtx.name, rtx.uuid) == (
        "cuda:0",
        0,
        "NVIDIA GeForce RTX 4060",
        "GPU-0",
    )
    assert (rtx.memory_total, rtx.memory_used, rtx.memory_free) == (8188, 1000, 7188)
    assert rtx.temperature == 51.0 and rtx.utilization == 37.0
    assert v100.temperature is None  # unsupported reading: None, not an error
    assert v100.processes == ((4242, 1542),)


def test_gpu_lost_is_reported_offline_then_recovers() -> None:
    nvml = two_gpus()
    provider = CudaProvider(nvml=nvml, smi=None)
    assert provider.probe().online
    nvml.lost = True
    report = provider.probe()
    assert not report.online and report.reason == "NVML error: GPU is lost"
    nvml.lost = False
    assert provider.probe().online and nvml.inits == 2  # re-initialised after the loss


def test_no_nvml_no_smi_is_offline_with_reason_and_not_retried_every_poll() -> None:
    nvml = two_gpus()
    nvml.fail_init = True
    provider = CudaProvider(nvml=nvml, smi="no-such-nvidia-smi")
    report = provider.probe()
    assert not report.online
    assert report.reason == "NVML unavailable: Driver Not Loaded; no nvidia-smi"
    provider.probe()
    assert nvml.inits == 1


def test_nvidia_smi_fallback(tmp_path: Path) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  --query-gpu=*) echo '0, GPU-aaa, NVIDIA H100 80GB HBM3, 81559, 1545, 80014, 34, 0';;\n"
        "  --query-compute-apps=*) echo 'GPU-aaa, 777, 1542';;\n"
        "esac\n"
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    nvml = FakeNvml([])
    nvml.fail_init = True
    report = CudaProvider(nvml=nvml, smi=str(smi)).probe()
    assert report.online and report.info == {"source": "nvidia-smi"}
    (h100,) = report.devices
    assert (h100.name, h100.memory_total, h100.memory_free) == (
        "NVIDIA H100 80GB HBM3",
        81559,
        80014,
    )
    assert h100.processes == ((777, 1542),) and h100.temperature == 34.0


def test_amd_sysfs(tmp_path: Path) -> None:
    dev = tmp_path / "card1" / "device"
    (dev / "hwmon" / "hwmon3").mkdir(parents=True)
    (dev / "mem_info_vram_total").write_text(str(24 * 1024 * MIB))
    (dev / "mem_info_vram_used").write_text(str(2 * 1024 * MIB))
    (dev / "product_name").write_text("Radeon RX 7900 XTX\n")
    (dev / "gpu_busy_percent").write_text("12\n")
    (dev / "hwmon" / "hwmon3" / "temp1_input").write_text("48000\n")
    (tmp_path / "card1-DP-1").mkdir()  # a connector, not a card
    provider = AmdProvider(tmp_path)
    assert provider.present()
    (gpu,) = provider.probe().devices
    assert (gpu.key, gpu.name, gpu.memory_total, gpu.memory_free) == (
        "amd:0",
        "Radeon RX 7900 XTX",
        24576,
        22528,
    )
    assert gpu.temperature == 48.0 and gpu.utilization == 12.0
    assert not AmdProvider(tmp_path / "none").present()


async def test_monitor_caches_and_survives_a_broken_provider() -> None:
    class Broken:
        name = "broken"

        def probe(self) -> Any:
            raise RuntimeError("boom")

    monitor = DeviceMonitor([CpuProvider(), Broken()], poll_interval=60)
    first, second = await asyncio.gather(monitor.snapshot(), monitor.snapshot())
    assert first is second  # one probe for concurrent callers
    assert (await monitor.snapshot()) is first  # cached for the poll interval
    cpu, broken = first.reports
    assert cpu.online and cpu.info["memory_total"] > 0
    assert not broken.online and "boom" in (broken.reason or "")


async def test_devices_info_shape_and_model_processes(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nvml = two_gpus()
    monkeypatch.setattr("llm_manager.app.CudaProvider", lambda: CudaProvider(nvml=nvml, smi=None))
    command = fake_command("--spawn-log", str(spawn_log))
    models = {"m": {"schemes": {"GPU": {"devices": {"cuda:1": 1000}, "command": command}}}}
    loaded = make_config(
        tmp_path, models, devices=[{"name": "old card", "kind": "other", "memory_total_mib": 512}]
    )
    async with running_manager(loaded) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        runtime = mgr.supervisor.resolve("m")
        nvml.gpus[1]["procs"].append((runtime.pid, 900))  # our model shows up on the GPU
        mgr.app.monitor._latest = None  # noqa: SLF001 - read the new state now
        status, body = await mgr.get("/api/devices/info")
        assert status == 200 and body["success"] is True
        devices = body["devices"]
        assert set(devices) == {"cpu", "cuda", "static"}
        cpu = devices["cpu"]
        assert cpu["online"] is True
        assert {"cpu_count", "memory_total", "memory_used", "memory_free"} <= set(cpu["info"])
        cuda = devices["cuda"]
        assert cuda["online"] is True and cuda["info"]["device_count"] == 2
        rtx = cuda["info"]["devices"][0]
        assert {
            k: rtx[k] for k in ("name", "memory_total", "memory_used", "memory_free", "temperature")
        } == {
            "name": "NVIDIA GeForce RTX 4060",
            "memory_total": 8188,
            "memory_used": 1000,
            "memory_free": 7188,
            "temperature": 51.0,
        }
        v100 = cuda["info"]["devices"][1]
        assert {"pid": runtime.pid, "memory_used": 900, "model": "m"} in v100["processes"]
        assert {"pid": 4242, "memory_used": 1542, "model": None} in v100["processes"]
        assert devices["static"]["info"]["devices"][0]["name"] == "old card"
        # The scheme's index reached the model.
        await wait_until(
            lambda: any(x.message == "CUDA_VISIBLE_DEVICES=1" for x in runtime.log.lines())
        )
        # The GPU disappears while the model runs: reported offline, nothing breaks.
        nvml.lost = True
        mgr.app.monitor._latest = None  # noqa: SLF001
        status, body = await mgr.get("/api/devices/info")
        assert status == 200 and body["devices"]["cuda"]["online"] is False
        assert body["devices"]["cuda"]["error"] == "NVML error: GPU is lost"
        status, info = await mgr.get("/api/models/m/info")
        assert status == 200 and info["model"]["status"] == "routing"
        assert info["model"]["config_source"] == "GPU"  # in use: still its scheme
        await mgr.post("/api/models/m/stop")
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["is_available"] is False  # no cuda:1 now
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "device 'cuda:1' not present" in body["error"]


async def test_concurrent_starts_do_not_claim_the_same_memory(
    tmp_path: Path, spawn_log: Path
) -> None:
    def on_gpu() -> dict[str, Any]:
        command = fake_command("--spawn-log", str(spawn_log), "--slow-start", "0.5")
        return {"schemes": {"GPU": {"devices": {"gpu": 6000}, "command": command}}}

    loaded = make_config(
        tmp_path,
        {"a": on_gpu(), "b": on_gpu()},
        devices=[{"name": "test gpu", "memory_total_mib": 8000}],
    )
    async with running_manager(loaded) as mgr:
        results = await asyncio.gather(
            mgr.post("/api/models/a/start"), mgr.post("/api/models/b/start")
        )
        # The second waits for the first (starting, then ready) and evicts it: both
        # starts succeed, one after the other, never both holding the memory.
        assert [status for status, _ in results] == [200, 200]
        runtimes = {r.name: r for r in mgr.supervisor.runtimes}
        (gone,) = [n for n, r in runtimes.items() if r.state is State.STOPPED]
        (kept,) = [n for n, r in runtimes.items() if r.state is State.ROUTING]
        assert any(
            f"evicted to make room for {kept}" in x.message for x in runtimes[gone].log.lines()
        )
        await mgr.post("/api/models/stop-all")


async def test_scheme_fallback_when_memory_runs_short(tmp_path: Path, spawn_log: Path) -> None:
    command = fake_command("--spawn-log", str(spawn_log))
    models = {
        "m": {
            "schemes": {
                "GPU": {"devices": {"gpu": 10000}, "command": command},
                "CPU": {"devices": {"cpu": 1}, "command": command},
            }
        }
    }
    loaded = make_config(tmp_path, models, devices=[{"name": "gpu", "memory_total_mib": 8000}])
    async with running_manager(loaded) as mgr:
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["config_source"] == "CPU"
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["config_source"] == "CPU" and info["model"]["is_available"] is True
        await mgr.post("/api/models/m/stop")


def test_cli_devices(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        json.dumps(
            {
                "server": {"data_dir": str(tmp_path / "d")},
                "devices": [{"name": "Tesla T4", "memory_total_mib": 15360, "index": 0}],
            }
        )
    )
    m = launch(config, tmp_path)
    try:
        table = m.cli("devices")
        assert table.returncode == 0 and "Tesla T4" in table.stdout and "cpu" in table.stdout
        data = json.loads(m.cli("devices", "--json").stdout)
        assert data["devices"]["static"]["info"]["devices"][0]["memory_total"] == 15360
    finally:
        m.proc.terminate()
        m.proc.wait(30)
