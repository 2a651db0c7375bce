"""The processes this manager started, recorded in ``data_dir`` for cleanup after a crash.

A manager killed with SIGKILL cannot stop its models; the parent-death signal and the
reaper normally do, and this record is the last line: at start, every group recorded
by an earlier run whose leader is still the same process (same start time) is killed.
A scheme's ``stop_command`` is recorded too (its placeholders filled in) and run first,
whether or not the group is still there: a container the model ran outlives its client.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

log = logging.getLogger(__name__)


class RunState:
    """Owns ``data_dir/run/processes.json``. Single writer: the event loop thread."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / "run" / "processes.json"
        self._records: dict[str, dict[str, object]] = {}

    def cleanup_previous(self) -> list[tuple[str, int]]:
        """Kill what an earlier run left; returns the (model, PID) killed."""
        killed: list[tuple[str, int]] = []
        try:
            records = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            records = {}
        if not isinstance(records, dict):
            records = {}
        for model, rec in records.items():
            if not isinstance(rec, dict):
                continue
            pid, pgid, created = rec.get("pid"), rec.get("pgid"), rec.get("create_time")
            if not isinstance(pid, int) or not isinstance(pgid, int):
                continue
            _run_stop_command(str(model), rec.get("stop"))
            if not _ours(pid, pgid, created):
                continue
            log.warning("killing model %s (pid %s) left by an earlier run", model, pid)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            killed.append((str(model), pid))
        self._records = {}
        self._write()
        return killed

    def add(self, model: str, pid: int, pgid: int, stop: dict[str, object] | None = None) -> None:
        created: float | None
        try:
            created = psutil.Process(pid).create_time()
        except psutil.Error:
            created = None
        self._records[model] = {
            "pid": pid,
            "pgid": pgid,
            "create_time": created,
            "recorded_at": time.time(),
        }
        if stop is not None:
            self._records[model]["stop"] = stop
        self._write()

    def remove(self, model: str) -> None:
        if self._records.pop(model, None) is not None:
            self._write()

    def _write(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._records), encoding="utf-8")
            os.replace(tmp, self._path)
        except OSError as exc:  # losing the record must not stop a model from running
            log.error("cannot record model processes in %s: %s", self._path, exc)


def _ours(pid: int, pgid: int, create_time: object) -> bool:
    """Whether the recorded group is still the one an earlier run started.

    The leader alive with the recorded start time is ours. A leader gone while its group
    lives on (workers it forked) is ours too: Linux does not hand out a PID that is still
    in use as a process group ID, so the group cannot belong to anyone else.
    """
    if not isinstance(create_time, int | float):
        return False  # no identity to check: never kill on a guess
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE:
            return abs(proc.create_time() - create_time) < 1
    except psutil.Error:
        pass
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _run_stop_command(model: str, stop: object) -> None:
    """Run a recorded stop_command (an earlier run's model), its group killed past its
    timeout. Its failure is only logged: the group is killed next anyway."""
    if not isinstance(stop, dict):
        return
    argv, cwd, timeout = stop.get("argv"), stop.get("cwd"), stop.get("timeout")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return
    if not isinstance(timeout, int | float) or timeout <= 0:
        timeout = 30.0
    log.warning("running the stop_command of model %s left by an earlier run", model)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd if isinstance(cwd, str) else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.error("cannot run the stop_command of model %s: %s", model, exc)
        return
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.error("the stop_command of model %s ran past %g s and was killed", model, timeout)
        return
    if code != 0:
        log.error("the stop_command of model %s failed with exit code %s", model, code)
