"""nginx as the load balancer in front of gateway replicas (the setup of docs/replicas.md),
for the replica tests and benchmarks/replicas.py."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _backend() -> Any:
    """benchmarks/backend.py (not a package): its nginx preamble, one process in a folder."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "backend.py"
    spec = importlib.util.spec_from_file_location("bench_backend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The balancer of docs/replicas.md, in a folder of its own, one worker process. A replica
# that refuses connections is skipped (error) and left out for fail_timeout; a POST already
# sent is not sent again (nginx's default for non-idempotent requests).
BALANCER = """
    upstream replicas {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_next_upstream error timeout;
            add_header X-Replica $upstream_addr always;
        }}
    }}
}}
"""


def find_nginx() -> str | None:
    return shutil.which("nginx") or shutil.which("/usr/sbin/nginx")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Balancer:
    """One nginx in front of the replicas at ``backends`` (HOST:PORT each)."""

    def __init__(self, nginx: str, folder: Path, backends: Sequence[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(f"        server {b} max_fails=1 fail_timeout=10s;" for b in backends)
        conf = folder / "nginx.conf"
        template = _backend().NGINX_PREAMBLE + BALANCER  # the http block it opens ends here
        conf.write_text(template.format(dir=folder, servers=servers, port=self.port))
        self._log = (folder / "nginx.out").open("wb")
        self.proc = subprocess.Popen(
            [nginx, "-p", str(folder), "-c", str(conf)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start: " + (folder / "error.log").read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
