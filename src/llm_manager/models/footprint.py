"""Measured memory: what a running model's process tree holds on each of its devices,
and the peaks per scheme kept across runs (issue 18: measured, not guessed).

GPU memory is read per process (NVML's compute processes, as the device snapshot lists
them), host memory as the resident set of the process tree (psutil). A device whose
reading does not list any of the model's processes (NVML inside a container sees other
PIDs) has no reading: nothing is recorded for it, rather than a false zero.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import psutil

from llm_manager.config import SchemeConfig
from llm_manager.devices.base import Device
from llm_manager.store.footprints import Footprint, FootprintStore

log = logging.getLogger(__name__)
HOST_KEY = "cpu"  # the key system memory has, in schemes and in device snapshots
_MIB = 1024 * 1024


def definition_of(scheme: SchemeConfig) -> str:
    """A short fingerprint of what decides a scheme's footprint (how it is started)."""
    text = json.dumps(
        [scheme.command, scheme.script, sorted(scheme.env.items()), scheme.cwd],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process, from one pass over the process table
    (portable, and what psutil does; costly on a machine with many processes)."""
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid is not None:
            children.setdefault(ppid, []).append(proc.pid)
    return children


def _kernel_children(pid: int) -> list[int] | None:
    """The children of ``pid`` as Linux lists them per thread (/proc/PID/task/TID/children,
    a few small reads); [] when the process is gone, None where the kernel does not
    offer these files (not Linux, or no CONFIG_PROC_CHILDREN)."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return [] if os.path.isdir("/proc/self/task") else None
    except OSError:
        return None
    children: list[int] = []
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as handle:
                children += [int(child) for child in handle.read().split()]
        except FileNotFoundError:
            if os.path.isdir(f"/proc/{pid}/task/{tid}"):
                return None  # the thread is there, its children file is not: no support
        except (OSError, ValueError):
            return None
    return children


def _tree(pid: int, children: Callable[[int], Sequence[int] | None]) -> list[int] | None:
    """The process and its descendants, or None where ``children`` cannot tell."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        found = children(current)
        if found is None:
            return None
        out.append(current)
        todo.extend(found)
    return out


def _rss(pid: int) -> int | None:
    """Resident bytes of one process (/proc/PID/statm where there is one), None if gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _page_size()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def _lookup(table: Mapping[int, list[int]]) -> Callable[[int], Sequence[int]]:
    def children(pid: int) -> Sequence[int]:
        return table.get(pid, ())

    return children


@functools.cache
def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def read_usages(pids: Mapping[str, int], devices: Sequence[Device]) -> dict[str, dict[str, int]]:
    """For each model's process (name -> PID): MiB its process tree holds, by Device.key:
    ``cpu`` (resident set) and every GPU whose per-process list shows one of its
    processes. Models whose process is gone are left out. Blocking (/proc reads).

    It runs every second while models serve, so it reads only the models' own processes
    (Linux lists each process's children); elsewhere it takes one pass over the whole
    process table (measured under streamed load: the pass with psutil was 1.5% of the
    manager's CPU on this small machine)."""
    table: dict[int, list[int]] | None = None
    out = {}
    for name, pid in pids.items():
        tree = _tree(pid, _kernel_children)
        if tree is None:
            table = _children_map() if table is None else table
            tree = _tree(pid, _lookup(table))
        sizes = [size for p in tree or () if (size := _rss(p)) is not None]
        if not sizes:
            continue  # gone
        usage = {HOST_KEY: -(-sum(sizes) // _MIB)}
        wanted = set(tree or ())
        for dev in devices:
            held = [mib for p, mib in dev.processes if p in wanted]
            if held and dev.kind != "cpu":
                usage[dev.key] = sum(held)
        out[name] = usage
    return out


@dataclass
class _Run:
    """One run of a model being measured."""

    scheme: str
    definition: str
    # Device.key -> the scheme's device key, so that readings are kept per scheme key
    # (a scheme's "cuda:0" may land on another GPU next time; its needs are the same).
    keys: dict[str, str]
    declared: dict[str, int | str]
    current: dict[str, int] = field(default_factory=dict)  # by Device.key
    warned: set[str] = field(default_factory=set)


class FootprintBook:
    """Owns the measured footprints (loaded from the store at start, kept up to date by
    ``record``) and the latest reading of each running model. Event loop only."""

    def __init__(self, store: FootprintStore | None, clock: Callable[[], float] = time.time):
        self._store = store
        self._clock = clock
        self._book: dict[tuple[str, str, str], Footprint] = {}
        self._runs: dict[str, _Run] = {}
        self._shown: dict[str, dict[str, int]] = {}  # show()

    def load(self) -> None:
        if self._store is None:
            return
        try:
            rows = self._store.load_all()
        except Exception as exc:  # an unreadable store leaves measurements empty, not a crash
            log.error("cannot read measured footprints: %s", exc)
            return
        self._book = {(fp.model, fp.scheme, fp.device): fp for fp in rows}

    # --- queries ------------------------------------------------------------------------

    def measured(self, model: str, scheme: str, definition: str) -> dict[str, Footprint]:
        """The footprints of a scheme's current definition, by scheme device key."""
        return {
            key: fp
            for (m, s, key), fp in self._book.items()
            if m == model and s == scheme and fp.definition == definition
        }

    async def forget(self, model: str) -> int:
        """Drop every measurement of a model (a run in progress is measured afresh from
        its next reading on); how many footprints there were."""
        keys = [key for key in self._book if key[0] == model]
        for key in keys:
            del self._book[key]
        run = self._runs.get(model)
        if run is not None:
            run.warned.clear()
        if self._store is None:
            return len(keys)
        return max(len(keys), await self._store.forget(model))

    def current(self, model: str) -> dict[str, int]:
        """The latest reading of a running model, by Device.key ({} when none)."""
        run = self._runs.get(model)
        if run is not None:
            return dict(run.current)
        return dict(self._shown.get(model, {}))

    def show(self, model: str, reading: dict[str, int]) -> None:
        """A reading taken by another process, shown as the model's latest (a gateway
        replica shows its controller's: cluster/replica.py); not recorded here."""
        self._shown[model] = reading

    def rows(self) -> list[Footprint]:
        return list(self._book.values())

    # --- a run --------------------------------------------------------------------------

    def begin(
        self,
        model: str,
        scheme: str,
        definition: str,
        assignment: Mapping[str, str],
        declared: Mapping[str, int | str],
    ) -> None:
        """A run was placed: its scheme keys sit on these devices (scheme key -> Device.key)."""
        keys = {dev: key for key, dev in assignment.items()}
        keys.setdefault(HOST_KEY, HOST_KEY)  # host memory is measured for every model
        self._runs[model] = _Run(scheme, definition, keys, dict(declared))

    def end(self, model: str) -> None:
        self._runs.pop(model, None)

    def ready(self, model: str) -> None:
        """The run became ready: it counts in ``runs`` (a start that failed does not)."""
        run = self._runs.get(model)
        if run is None:
            return
        for key in set(run.keys.values()):
            fp = self._entry(model, run.scheme, run.definition, key)
            self._put(replace(fp, runs=fp.runs + 1, updated_at=self._clock()))

    def record(self, model: str, usage: Mapping[str, int], serving: bool) -> list[str]:
        """Take a reading (by Device.key). Returns warnings new to this run: a device whose
        measured footprint went above what the scheme declares."""
        run = self._runs.get(model)
        if run is None:
            return []
        run.current = dict(usage)
        warnings = []
        for dev, mib in usage.items():
            key = run.keys.get(dev)
            if key is None:
                continue
            fp = self._entry(model, run.scheme, run.definition, key)
            if serving and (fp.serve_peak or 0) < mib:
                self._put(replace(fp, serve_peak=mib, updated_at=self._clock()))
            elif not serving and (fp.load_peak or 0) < mib:
                self._put(replace(fp, load_peak=mib, updated_at=self._clock()))
            declared = run.declared.get(key)
            if isinstance(declared, int) and declared and mib > declared and key not in run.warned:
                run.warned.add(key)
                warnings.append(
                    f"measured {mib} MiB on {key}, above the {declared} MiB its scheme "
                    f"{run.scheme!r} declares"
                )
        return warnings

    def _entry(self, model: str, scheme: str, definition: str, key: str) -> Footprint:
        fp = self._book.get((model, scheme, key))
        if fp is None or fp.definition != definition:
            # First run, or the scheme changed since: earlier figures say nothing now.
            fp = Footprint(model, scheme, key, definition, None, None, 0, self._clock())
        return fp

    def _put(self, fp: Footprint) -> None:
        self._book[(fp.model, fp.scheme, fp.device)] = fp
        if self._store is not None:
            self._store.save(fp)
