"""``GET /api/devices/info``: every device family in the seed's shape."""

from __future__ import annotations

from typing import Any

import psutil
from fastapi import APIRouter

from llm_manager.devices.base import Device, ProviderReport
from llm_manager.devices.monitor import Snapshot
from llm_manager.models.supervisor import Supervisor


def model_pids(supervisor: Supervisor) -> dict[int, str]:
    """PID -> model for every model process and its descendants (engines fork workers)."""
    owners: dict[int, str] = {}
    for runtime in supervisor.runtimes:
        pid = runtime.local_pid
        if pid is None:
            continue
        owners[pid] = runtime.name
        try:
            for child in psutil.Process(pid).children(recursive=True):
                owners[child.pid] = runtime.name
        except psutil.Error:
            pass
    return owners


def device_view(device: Device, owners: dict[int, str]) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": device.name,
        "memory_total": device.memory_total,
        "memory_used": device.memory_used,
        "memory_free": device.memory_free,
        "temperature": device.temperature,
        "key": device.key,
        "index": device.index,
        "online": device.online,
    }
    if device.node is not None:
        view["node"] = device.node
    if device.uuid is not None:
        view["uuid"] = device.uuid
    if device.utilization is not None:
        view["utilization"] = device.utilization
    if device.kind in ("cuda", "amd") and device.measured:
        view["processes"] = [
            {"pid": pid, "memory_used": mib, "model": owners.get(pid)}
            for pid, mib in device.processes
        ]
    return view


def report_view(report: ProviderReport, owners: dict[int, str]) -> dict[str, Any]:
    if report.provider == "cpu":
        info = dict(report.info)
        if report.devices and report.devices[0].temperature is not None:
            info["temperature"] = report.devices[0].temperature
        body: dict[str, Any] = {"online": report.online, "info": info}
    else:
        body = {
            "online": report.online,
            "info": {
                "device_count": len(report.devices),
                "devices": [device_view(d, owners) for d in report.devices],
            },
        }
    if report.reason:
        body["error"] = report.reason
    if "source" in report.info:
        body["source"] = report.info["source"]
    if "nodes" in report.info:  # cluster mode: every node, named
        body["nodes"] = report.info["nodes"]
    return body


def all_devices(supervisor: Supervisor, snapshot: Snapshot) -> dict[str, Any]:
    """The ``devices`` body of ``/api/devices/info``: one entry per device family."""
    owners = model_pids(supervisor)
    return {r.provider: report_view(r, owners) for r in snapshot.reports}


def router(supervisor: Supervisor) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["devices"])

    @api.get("/devices/info", summary="GPUs and CPU: memory, temperature, our processes")
    async def devices_info() -> dict[str, Any]:
        snapshot = await supervisor.monitor.snapshot()
        return {"success": True, "devices": all_devices(supervisor, snapshot)}

    return api
