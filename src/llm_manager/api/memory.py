"""The ``memory`` part of a model's info: declared, planned, measured and estimated MiB."""

from __future__ import annotations

from typing import Any

from llm_manager.models.footprint import HOST_KEY
from llm_manager.models.runtime import ModelRuntime
from llm_manager.models.sizing import DeviceNeed
from llm_manager.models.supervisor import Supervisor
from llm_manager.store.footprints import Footprint


def memory_info(
    supervisor: Supervisor, runtime: ModelRuntime, scheme: str | None
) -> dict[str, Any]:
    """For the scheme in use (or the one a start would pick), per scheme device key:
    ``declared`` (MiB or "auto"), ``planned`` (what placement uses; null when it cannot be
    planned), ``source`` (declared, measured, estimate, none), ``booked`` (this run),
    ``now`` (the latest reading while it runs), ``load_peak``/``serve_peak``/``runs``
    (measured over earlier runs of this scheme definition), ``estimate`` (GGUF). ``host``
    is the same for system memory when the scheme does not name ``cpu``."""
    spec = runtime.spec.schemes.get(scheme or "")
    if scheme is None or spec is None:
        return {"scheme": None, "devices": {}, "host": None, "warnings": [], "estimate_error": None}
    sized = supervisor.sizer.size(runtime.name, scheme, spec, read=False)  # never blocks
    booked = supervisor.booked(runtime.name) if runtime.scheme == scheme else {}
    placed = supervisor.placed_on(runtime.name) if runtime.scheme == scheme else {}
    current = supervisor.footprints.current(runtime.name)
    devices = {
        key: _device(need, booked.get(key), current.get(placed.get(key, key)))
        for key, need in sized.devices.items()
    }
    host = None
    if HOST_KEY not in sized.devices:
        measured = supervisor.footprints.measured(runtime.name, scheme, sized.definition)
        host = {"now": current.get(HOST_KEY), **_measured(measured.get(HOST_KEY))}
    return {
        "scheme": scheme,
        "devices": devices,
        "host": host,
        "warnings": [w for key, need in sized.devices.items() if (w := _warning(key, need))],
        "estimate_error": sized.estimate_error,
    }


def _device(need: DeviceNeed, booked: int | None, now: int | None) -> dict[str, Any]:
    return {
        "declared": need.declared,
        "planned": need.planned,
        "source": need.source,
        "booked": booked,
        "now": now,
        **_measured(need.measured),
        "estimate": need.estimate,
    }


def _measured(fp: Footprint | None) -> dict[str, Any]:
    if fp is None:
        return {"load_peak": None, "serve_peak": None, "runs": 0}
    return {"load_peak": fp.load_peak, "serve_peak": fp.serve_peak, "runs": fp.runs}


def _warning(key: str, need: DeviceNeed) -> str | None:
    peak = need.measured.peak if need.measured is not None else None
    declared = need.declared
    if isinstance(declared, int) and declared and peak is not None and peak > declared:
        return f"{key}: measured {peak} MiB, above the {declared} MiB declared"
    return None
