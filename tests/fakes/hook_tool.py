"""A hook for the hook tests: ``record FILE WORDS...`` appends a line to FILE and prints
it; ``fail CODE`` prints a line and exits with CODE; ``hang PIDFILE`` records its PID and
sleeps; ``signal PID SIG FILE`` appends ``signal PID SIG`` to FILE, then sends SIG to PID
and waits until it is gone (a stop_command)."""

from __future__ import annotations

import os
import sys
import time


def main() -> None:
    action, *rest = sys.argv[1:]
    if action == "record":
        line = " ".join(rest[1:])
        with open(rest[0], "a") as f:
            f.write(line + "\n")
        print(f"recorded {line}", flush=True)
    elif action == "fail":
        print("this hook fails on purpose", file=sys.stderr, flush=True)
        sys.exit(int(rest[0]))
    elif action == "hang":
        with open(rest[0], "w") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(600)
    elif action == "signal":
        pid, sig = int(rest[0]), int(rest[1])
        with open(rest[2], "a") as f:
            f.write(f"signal {pid} {sig}\n")
        os.kill(pid, sig)
        for _ in range(500):  # gone, or a zombie its parent has not reaped yet
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().split(") ", 1)[1][0] == "Z":
                        break
            except (OSError, IndexError):
                break
            time.sleep(0.01)
        print(f"sent signal {sig} to {pid}", flush=True)


if __name__ == "__main__":
    main()
