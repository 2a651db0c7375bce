"""JSON views of domain objects, in the seed's shapes."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from llm_manager.api.memory import memory_info
from llm_manager.config import MODE_LABELS
from llm_manager.devices.base import Device
from llm_manager.models.runtime import ModelRuntime, State
from llm_manager.models.supervisor import Supervisor

RUNNING = frozenset({State.STARTING, State.HEALTH_CHECK, State.ROUTING})


def running_count(runtimes: Sequence[ModelRuntime]) -> int:
    """Models with a live process that is not being stopped."""
    return sum(1 for r in runtimes if r.state in RUNNING)


def model_info(
    supervisor: Supervisor, runtime: ModelRuntime, devices: list[Device]
) -> dict[str, Any]:
    preview = supervisor.preview(runtime, devices)
    info = {
        "model_name": runtime.name,
        "aliases": list(runtime.spec.aliases),
        "status": runtime.state.value,
        "pid": runtime.pid,
        "idle_time_sec": int(runtime.idle_seconds()),
        "mode": MODE_LABELS[runtime.spec.mode],
        "is_available": preview.is_available,
        "current_bat_path": preview.command,
        "config_source": preview.scheme,
        "failure_reason": runtime.failure_reason,
        "pending_requests": runtime.pending,
        "waiting": runtime.waiting,
        "waiting_for": list(runtime.waiting_for),
        "turn_ends_in_sec": _seconds_until(runtime.turn_ends),
        "pinned": runtime.spec.pinned,
        "priority": runtime.spec.priority,
        "port": runtime.port,
        "auto_start": runtime.spec.auto_start,
        "idle_timeout_sec": runtime.idle_timeout,
        "start_count": runtime.start_count,
        "memory": memory_info(supervisor, runtime, preview.scheme),
    }
    if supervisor.cluster is not None:  # cluster mode: where the engine runs
        info["node"] = runtime.node
    return info


def _seconds_until(when: float | None) -> float | None:
    """Seconds left (0 once past) until a monotonic time, or None."""
    if when is None:
        return None
    return round(max(0.0, when - time.monotonic()), 1)


def all_models(supervisor: Supervisor, devices: list[Device]) -> dict[str, Any]:
    """The body of ``/api/models/all-models/info`` (without ``success``)."""
    runtimes = supervisor.runtimes
    return {
        "models": {r.name: model_info(supervisor, r, devices) for r in runtimes},
        "total_models": len(runtimes),
        "running_models": running_count(runtimes),
        "total_pending_requests": sum(r.pending for r in runtimes),
        "total_waiting_requests": sum(r.waiting for r in runtimes),
    }
