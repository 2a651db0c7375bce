"""Where a running ``llm-manager serve`` listens, kept in its data directory.

``serve`` writes ``DATA_DIR/run/url.json`` once it listens and removes it when it exits
cleanly. The client commands read it to find a server started with ``--port`` (or
``--port 0``) when nothing else tells them where it is. A file left by a manager that was
killed names a process that is gone (or a PID now used by another process, told apart by
its start time), and is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import psutil

RELATIVE = Path("run") / "url.json"


def path(data_dir: Path) -> Path:
    return data_dir / RELATIVE


def client_url(host: str, port: int) -> str:
    """The URL a client on this machine uses to reach a server bound to ``host:port``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def write(data_dir: Path, url: str) -> Path | None:
    """Record this process's URL; None (and nothing written) when the directory cannot be
    written: finding the server is a convenience, never a reason not to serve."""
    target = path(data_dir)
    pid = os.getpid()
    record = {"url": url, "pid": pid, "create_time": _create_time(pid)}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_text(json.dumps(record) + "\n", encoding="utf-8")
        partial.replace(target)
    except OSError:
        return None
    return target


def remove(data_dir: Path) -> None:
    """Remove the record if it is still this process's (another serve may have replaced it)."""
    target = path(data_dir)
    record = _load(target)
    if record is not None and record.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            target.unlink()


def read(data_dir: Path) -> str | None:
    """The URL of the manager that is running from ``data_dir``, or None."""
    record = _load(path(data_dir))
    if record is None:
        return None
    url, pid, created = record.get("url"), record.get("pid"), record.get("create_time")
    if not isinstance(url, str) or not isinstance(pid, int) or isinstance(pid, bool):
        return None
    now = _create_time(pid)
    if now is None:
        return None  # that manager is gone
    if isinstance(created, int | float) and abs(now - created) > 1.0:
        return None  # the PID belongs to another process now
    return url


def _load(target: Path) -> dict[str, object] | None:
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
