"""A container-style engine, like ``docker run`` and ``docker stop``, for the stop_command
and hook tests.

``run``: the "client" starts a detached "container" (a double fork into another session,
so it is neither in the client's process group nor among its descendants: neither the
signals to the group nor the reaper reach it), records its PID in ``STATE/NAME.pid`` (and
in ``--spawn-log``), and waits for it like ``docker run`` does; the container serves the
fake model server on the port. Killing the client leaves the container running.

``stop``: like ``docker stop NAME``: ends the container recorded for NAME (SIGKILL), and
appends ``stop NAME PID`` to ``STATE/stops.log``. Exit code 1 when there is none.

``rm``: like ``docker rm -f NAME``: the same, but no container is not an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

FAKE_SERVER = Path(__file__).with_name("fake_model_server.py")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def run(state: Path, name: str, port: int, spawn_log: str | None) -> None:
    state.mkdir(parents=True, exist_ok=True)
    pidfile = state / f"{name}.pid"
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the intermediate: it starts the container and exits at once
        os.close(read_end)
        os.setsid()
        if os.fork() == 0:  # the container
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.write(write_end, f"{os.getpid()}\n".encode())
            os.close(write_end)
            argv = [sys.executable, str(FAKE_SERVER), "--port", str(port), "--name", name]
            if spawn_log:
                argv += ["--spawn-log", spawn_log]
            os.execv(sys.executable, argv)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as r:
        container = int(r.readline())
    os.wait()  # the intermediate
    pidfile.write_text(f"{container}\n")
    print(f"client {os.getpid()}: container {container} started", flush=True)
    while _pid_alive(container):  # like `docker run`: lives as long as the container
        time.sleep(0.05)
    print("client: container ended", flush=True)
    sys.exit(0)


def stop(state: Path, name: str, missing_ok: bool) -> None:
    pidfile = state / f"{name}.pid"
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        pid = 0
    if not pid or not _pid_alive(pid):
        print(f"no such container: {name}", file=sys.stderr, flush=True)
        sys.exit(0 if missing_ok else 1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while _pid_alive(pid):
        time.sleep(0.01)
    pidfile.unlink(missing_ok=True)
    with open(state / "stops.log", "a") as f:
        f.write(f"stop {name} {pid}\n")
    print(f"stopped container {name} ({pid})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("action", choices=["run", "stop", "rm"])
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--spawn-log", default=None)
    args = p.parse_args()
    if args.action == "run":
        run(args.state, args.name, args.port, args.spawn_log)
    else:
        stop(args.state, args.name, missing_ok=args.action == "rm")


if __name__ == "__main__":
    main()
