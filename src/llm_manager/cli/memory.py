"""Memory in the CLI's words (issue 18): the ``memory`` part of a model's info as one line
per device (``llm-manager info``) or a short cell (``llm-manager models``), and the offline
plan of ``llm-manager estimate`` and ``check-config``: what a scheme declares, what the GGUF
estimate says, what earlier runs measured (read from the data directory's SQLite file,
read-only) and what a start would plan with, by the manager's own rules (models/sizing.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_manager.config import AUTO, LoadedConfig, SchemeConfig
from llm_manager.models.footprint import HOST_KEY, FootprintBook
from llm_manager.models.sizing import DeviceNeed, SchemeNeeds, Sizer, SizingSettings
from llm_manager.store.footprints import Footprint, FootprintStore

if TYPE_CHECKING:
    from llm_manager.engines.gguf_estimate import Estimate

DB_NAME = "llm-manager.db"  # in server.data_dir, as app.py names it
NOT_LLAMA = "not a llama.cpp command"

# --- info: the API's ``memory`` object ------------------------------------------------------


def _mib(value: Any) -> str:
    return "-" if value is None else str(value)


def _peaks(d: Mapping[str, Any]) -> str:
    """``peak 420 MiB (load 400, serve 420; 3 runs)``, or ``not measured``."""
    load, serve, runs = d.get("load_peak"), d.get("serve_peak"), d.get("runs") or 0
    seen = [v for v in (load, serve) if v is not None]
    if not seen:
        return "not measured" if not runs else f"not measured ({_runs(runs)})"
    return f"peak {max(seen)} MiB (load {_mib(load)}, serve {_mib(serve)}; {_runs(runs)})"


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _declared(value: Any) -> str:
    return "auto" if value == AUTO else f"{value} MiB"


def device_line(d: Mapping[str, Any]) -> str:
    """One device of a model's info: declared, measured peaks, now, planned, estimate."""
    parts = [f"declared {_declared(d.get('declared'))}", _peaks(d)]
    if d.get("now") is not None:
        parts.append(f"now {d['now']} MiB")
    planned = d.get("planned")
    source = d.get("source") or "none"
    if planned is None:
        parts.append("planned: nothing to go by")
    else:
        parts.append(f"planned {planned} MiB ({source})")
    if d.get("booked") is not None and d.get("booked") != planned:
        parts.append(f"booked {d['booked']} MiB")
    if d.get("estimate") is not None:
        parts.append(f"estimate {d['estimate']} MiB")
    return ", ".join(parts)


def host_line(h: Mapping[str, Any]) -> str:
    """System memory of a scheme that does not name ``cpu`` (measured, never planned)."""
    parts = [_peaks(h)]
    if h.get("now") is not None:
        parts.append(f"now {h['now']} MiB")
    return ", ".join(parts)


def info_rows(memory: Mapping[str, Any] | None) -> list[tuple[str, str, str | None]]:
    """Rows (field, value, style) for ``llm-manager info``: one per device, then the system
    memory, the estimate's failure and each warning (yellow)."""
    if not memory or memory.get("scheme") is None:
        return [("memory", "-", None)]
    rows: list[tuple[str, str, str | None]] = []
    for key, d in (memory.get("devices") or {}).items():
        rows.append((f"memory {key}", device_line(d), None))
    if memory.get("host"):
        rows.append(("memory system", host_line(memory["host"]), None))
    if memory.get("estimate_error"):
        rows.append(("memory estimate", f"failed: {memory['estimate_error']}", None))
    for warning in memory.get("warnings") or []:
        rows.append(("memory warning", str(warning), "yellow"))
    return rows or [("memory", "-", None)]


def short(memory: Mapping[str, Any] | None) -> str:
    """The models table's cell: per device ``cpu 420/1024`` (measured peak/declared MiB),
    ``cpu auto→estimate 462`` (auto: what is planned and from what); ``!`` marks a device
    measured above its declared number."""
    if not memory or memory.get("scheme") is None:
        return "-"
    cells = []
    for key, d in (memory.get("devices") or {}).items():
        peaks = [v for v in (d.get("load_peak"), d.get("serve_peak")) if v is not None]
        peak = max(peaks) if peaks else None
        declared = d.get("declared")
        if declared == AUTO:
            planned = d.get("planned")
            cell = f"{key} auto→{d.get('source')} {planned}" if planned else f"{key} auto→none"
        else:
            cell = f"{key} {_mib(peak)}/{declared}"
            if isinstance(declared, int) and declared and peak is not None and peak > declared:
                cell += "!"
        cells.append(cell)
    if not cells and memory.get("host"):
        host = memory["host"]
        peaks = [v for v in (host.get("load_peak"), host.get("serve_peak")) if v is not None]
        if peaks:
            cells.append(f"system {max(peaks)}")
    if not cells:
        return "-"
    numbers = any(any(ch.isdigit() for ch in c.split(" ", 1)[1]) for c in cells)
    return ", ".join(cells) + (" MiB" if numbers else "")


# --- offline: estimate and check-config ------------------------------------------------------


class _ReadRows(FootprintStore):
    """Footprints read once from the file; the book never writes them back here."""

    def __init__(self, rows: list[Footprint]) -> None:
        self._rows = rows

    def save(self, fp: Footprint) -> None:
        pass

    def load_all(self) -> list[Footprint]:
        return list(self._rows)


_FOOTPRINTS = (
    "SELECT model, scheme, device, definition, load_peak_mib, serve_peak_mib, "
    "runs, updated_at FROM footprints"
)


def read_footprints(data_dir: Path, store: str | None = None) -> tuple[list[Footprint], str | None]:
    """The measured footprints kept in the store (``data_dir``'s database, or the
    PostgreSQL ``store``), read-only. No file (the manager never ran there), or none of
    the table yet: no measurements. Returns the rows and a note when the store exists but
    cannot be read."""
    if store is not None:
        return _read_postgres(store)
    path = data_dir / DB_NAME
    if not path.is_file():
        return [], None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = conn.execute(_FOOTPRINTS).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):
            return [], None
        return [], f"cannot read the measurements in {path}: {exc}"
    return [Footprint(*row) for row in rows], None


def _read_postgres(url: str) -> tuple[list[Footprint], str | None]:
    from llm_manager.store.postgres import MissingDriver, PostgresDriver

    try:
        driver = PostgresDriver(url)
    except MissingDriver as exc:
        return [], str(exc)
    try:
        conn = driver.connect(writer=False)
        try:
            rows = conn.execute(_FOOTPRINTS).fetchall()
        finally:
            conn.close()
    except driver.errors as exc:
        if getattr(exc, "sqlstate", None) == "42P01":  # no table: never ran with this store
            return [], None
        return [], f"cannot read the measurements in {driver.name}: {exc}"
    return [Footprint(*tuple(row)) for row in rows], None


@dataclass(frozen=True)
class DevicePlan:
    key: str
    need: DeviceNeed | None  # None: system memory of a scheme without "cpu" (not planned)
    estimate: int | None
    measured: Footprint | None

    @property
    def error_percent(self) -> float | None:
        """The estimate against the measured peak, in percent of the measurement."""
        peak = self.measured.peak if self.measured is not None else None
        if self.estimate is None or not peak:
            return None
        return (self.estimate - peak) / peak * 100


@dataclass(frozen=True)
class SchemePlan:
    model: str
    scheme: str
    needs: SchemeNeeds
    devices: list[DevicePlan]
    estimate: Estimate | None
    no_estimate: str | None  # why there is none: not llama.cpp, or the estimate's error
    earlier_runs: int = 0  # runs measured under an earlier definition of the scheme
    margin: str = ""
    notes: list[str] = field(default_factory=list)


def _estimate(
    loaded: LoadedConfig, model: str, scheme: SchemeConfig
) -> tuple[Estimate | None, dict[str, int], str | None]:
    """The GGUF estimate of a scheme: the full one, MiB per key (its device keys, plus
    ``cpu`` for the host even where the scheme does not name it), or why there is none."""
    from llm_manager.engines import gguf_estimate

    try:
        found = gguf_estimate.estimate_for_scheme(
            scheme,
            name=model,
            data_dir=loaded.config.server.data_dir,
            base_dir=loaded.base_dir,
        )
    except (gguf_estimate.EstimateError, OSError, ValueError) as exc:
        return None, {}, str(exc) or type(exc).__name__
    if found is None:
        return None, {}, NOT_LLAMA
    mib = dict(zip(gguf_estimate.gpu_keys(scheme.devices), found.gpu_mib, strict=True))
    mib[HOST_KEY] = found.host_mib
    return found, mib, None


def plan_scheme(
    loaded: LoadedConfig, model: str, scheme_name: str, rows: list[Footprint]
) -> SchemePlan:
    """What a start of this scheme would plan with, by the manager's own Sizer, from the
    measurements in ``rows`` and the GGUF estimate."""
    scheme = loaded.config.models[model].schemes[scheme_name]
    server = loaded.config.server
    found, per_key, reason = _estimate(loaded, model, scheme)
    book = FootprintBook(_ReadRows(rows))
    book.load()
    declared_estimate = {k: per_key[k] for k in scheme.devices if k in per_key} or None
    sizer = Sizer(
        book,
        SizingSettings(server.memory_margin, server.measured_raises_declared),
        lambda _m, _n, _s: declared_estimate if found is not None else None,
    )
    needs = sizer.size(model, scheme_name, scheme)
    measured = book.measured(model, scheme_name, needs.definition)
    devices = [
        DevicePlan(key, need, per_key.get(key), measured.get(key))
        for key, need in needs.devices.items()
    ]
    if HOST_KEY not in needs.devices and (HOST_KEY in per_key or HOST_KEY in measured):
        devices.append(DevicePlan(HOST_KEY, None, per_key.get(HOST_KEY), measured.get(HOST_KEY)))
    earlier = max(
        (
            fp.runs
            for fp in rows
            if fp.model == model and fp.scheme == scheme_name and fp.definition != needs.definition
        ),
        default=0,
    )
    return SchemePlan(
        model,
        scheme_name,
        needs,
        devices,
        found,
        reason,
        earlier,
        str(server.memory_margin),
    )


def _signed(value: float) -> str:
    return f"{value:+.1f}%"


def _planned(need: DeviceNeed, margin: str) -> str:
    if need.planned is None:
        return "a start is refused: nothing measured, no estimate; write the MiB it needs"
    how = {
        "declared": "as declared",
        "measured": f"measured peak + {margin}",
        "estimate": f"estimate + {margin}",
    }.get(need.source, need.source)
    return f"a start plans {need.planned} MiB ({how})"


def device_plan_line(d: DevicePlan, margin: str) -> str:
    """One device of ``llm-manager estimate``."""
    if d.need is None:
        parts = ["system memory (not in the scheme's devices, not planned)"]
    else:
        parts = [f"declared {_declared(d.need.declared)}"]
    parts.append("estimate -" if d.estimate is None else f"estimate {d.estimate} MiB")
    if d.measured is None:
        parts.append("not measured")
    else:
        parts.append(
            _peaks(
                {
                    "load_peak": d.measured.load_peak,
                    "serve_peak": d.measured.serve_peak,
                    "runs": d.measured.runs,
                }
            ).replace("peak", "measured peak", 1)
        )
    error = d.error_percent
    if error is not None:
        parts.append(f"estimate error {_signed(error)}")
    if d.need is not None:
        parts.append(_planned(d.need, margin))
    return ", ".join(parts)


def parts_line(found: Estimate) -> str:
    """The estimate's parts (MiB), the zero ones left out."""
    shown = [f"{name.replace('_', ' ')} {mib:.1f}" for name, mib in found.parts.items() if mib]
    return "parts (MiB): " + ", ".join(shown)


def plan_lines(plan: SchemePlan) -> list[str]:
    """``llm-manager estimate``'s lines for one scheme."""
    lines = [f"{plan.model}:{plan.scheme} (definition {plan.needs.definition})"]
    for d in plan.devices:
        lines.append(f"  {d.key}: {device_plan_line(d, plan.margin)}")
    if plan.estimate is not None:
        lines.append(f"  {parts_line(plan.estimate)}")
        if plan.estimate.notes:
            lines.append("  notes: " + "; ".join(plan.estimate.notes))
    else:
        lines.append(f"  no estimate: {plan.no_estimate}")
    if plan.earlier_runs:
        lines.append(
            f"  {_runs(plan.earlier_runs)} measured under an earlier definition of this "
            "scheme: ignored (the scheme changed since)"
        )
    return lines


def plan_json(plan: SchemePlan) -> dict[str, Any]:
    """``llm-manager estimate --json`` for one scheme."""
    devices = {}
    for d in plan.devices:
        m = d.measured
        devices[d.key] = {
            "declared": d.need.declared if d.need is not None else None,
            "planned": d.need.planned if d.need is not None else None,
            "source": d.need.source if d.need is not None else None,
            "estimate": d.estimate,
            "load_peak": m.load_peak if m is not None else None,
            "serve_peak": m.serve_peak if m is not None else None,
            "runs": m.runs if m is not None else 0,
            "error_percent": None if d.error_percent is None else round(d.error_percent, 1),
        }
    found = plan.estimate
    return {
        "model": plan.model,
        "scheme": plan.scheme,
        "definition": plan.needs.definition,
        "devices": devices,
        "parts": {k: round(v, 2) for k, v in found.parts.items()} if found else None,
        "notes": list(found.notes) if found else [],
        "no_estimate": plan.no_estimate,
        "earlier_definition_runs": plan.earlier_runs,
    }


def auto_line(plan: SchemePlan) -> str:
    """check-config's line for a scheme with ``auto`` devices: what a start would plan."""
    auto = [d for d in plan.devices if d.need is not None and d.need.declared == AUTO]
    where = f"models.{plan.model}.schemes.{plan.scheme}.devices"
    if any(d.need is not None and d.need.planned is None for d in auto):
        why = f" ({plan.no_estimate})" if plan.no_estimate else ""
        return (
            f"{where}: auto memory: nothing measured, no estimate{why}: a start will be "
            "refused until you write a number"
        )
    said = []
    for d in auto:
        if d.need is None:
            continue
        base = d.need.estimate
        if d.need.source == "measured" and d.measured is not None:
            base = d.measured.peak
        said.append(f"{d.key} {d.need.planned} MiB ({d.need.source} {base} + {plan.margin})")
    return f"{where}: auto memory: a start would plan {', '.join(said)}"


def auto_lines(loaded: LoadedConfig) -> list[str]:
    """check-config: one line per scheme with ``auto`` devices."""
    wanted = [
        (name, scheme_name)
        for name, model in loaded.config.models.items()
        for scheme_name, scheme in model.schemes.items()
        if any(v == AUTO for v in scheme.devices.values())
    ]
    if not wanted:
        return []
    rows, problem = read_footprints(loaded.config.server.data_dir, loaded.config.store)
    lines = [auto_line(plan_scheme(loaded, m, s, rows)) for m, s in wanted]
    return [problem, *lines] if problem else lines


def find_model(loaded: LoadedConfig, target: str) -> tuple[str, list[str]]:
    """``MODEL`` or ``MODEL:SCHEME`` (a name or an alias) -> the model's name and the
    schemes asked for. A name that itself holds a colon is taken whole first. Raises
    LookupError with a message for a person."""
    models = loaded.config.models
    names = {name: name for name in models}
    for name, model in models.items():
        for alias in model.aliases:
            names.setdefault(alias, name)
    if target in names:
        name = names[target]
        return name, list(models[name].schemes)
    head, sep, scheme = target.rpartition(":")
    if sep and head in names:
        name = names[head]
        if scheme not in models[name].schemes:
            known = ", ".join(models[name].schemes) or "none"
            raise LookupError(f"model {name!r} has no scheme {scheme!r} (its schemes: {known})")
        return name, [scheme]
    known = ", ".join(models) or "none"
    raise LookupError(f"no model {target!r} in {loaded.source} (models: {known})")
