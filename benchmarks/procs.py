"""Processes for the benchmark: starting the targets on loopback, reading their CPU and
memory from /proc, tearing everything down, and describing the machine."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
from backend import NGINX_PREAMBLE  # a sibling module: run.py puts benchmarks/ on sys.path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_LITELLM = "/work/bench-venvs/litellm/bin/litellm"
LITELLM_KEY = "sk-bench"
T = TypeVar("T")


def run_interruptible(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, torn down on SIGTERM as on Ctrl-C (``main``'s ``finally``
    stops what it started); interrupted, it exits with status 130."""
    interrupt_on_sigterm()
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        raise SystemExit(130) from None


def interrupt_on_sigterm() -> None:
    """SIGTERM tears a harness down as Ctrl-C does (its ``finally`` stops every process it
    started) instead of ending Python at once and leaving them running."""
    signal.signal(signal.SIGTERM, _as_sigint)


def _as_sigint(signum: int, frame: object) -> None:
    # SIGINT's handler, not an exception raised here: inside asyncio.run SIGINT cancels the
    # main task. A KeyboardInterrupt raised in this handler lands in whatever code the
    # signal interrupted, and where that was a fork handler (subprocess with a preexec_fn,
    # as wrk is started) Python ignored it and the harness ran on.
    signal.raise_signal(signal.SIGINT)


# --------------------------------------------------------------------------- /proc readings


def _own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """utime + stime of ``pid`` (and, with ``tree``, of its live descendants)."""
    total = _own_cpu(pid)
    if tree:
        for child in psutil.Process(pid).children(recursive=True):
            with contextlib.suppress(OSError):
                total += _own_cpu(child.pid)
    return total


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket is held until all are chosen (one at a
    time, the kernel may hand the same port out twice)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


# --------------------------------------------------------------------------- process set


class Processes:
    """Every process the benchmark starts, each in its own session; ``stop_all`` ends them
    (SIGTERM to the group, SIGKILL after a grace time), also after an error or Ctrl-C."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.log_path(name)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self._procs.append((name, proc))
        return proc

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 20.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        procs = [p for _, p in reversed(self._procs)]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self._procs.clear()


async def wait_http(
    url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float, interval: float = 0.05
) -> None:
    """Until ``url`` answers 200; fails early when ``proc`` exits."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{log.stem} exited ({proc.returncode}):\n{tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(interval)
    raise RuntimeError(f"{url} not ready after {timeout:g} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- the targets


def _executable(path: str) -> str | None:
    found = shutil.which(path)
    return found if found and os.access(found, os.X_OK) else None


def find_nginx(option: str | None) -> str | None:
    """``--nginx PATH``, else ``nginx`` on PATH or in /usr/sbin; ``none`` disables."""
    if option:
        return None if option == "none" else _executable(option)
    return _executable("nginx") or _executable("/usr/sbin/nginx")


def find_wrk(option: str | None) -> str | None:
    """``--wrk PATH``, else ``wrk`` on PATH; ``none`` disables."""
    if option:
        return None if option == "none" else _executable(option)
    return _executable("wrk")


def find_go(option: str | None) -> str | None:
    """``--go PATH``, else ``go`` on PATH or in /usr/lib/go/bin; ``none`` disables."""
    if option:
        return None if option == "none" else _executable(option)
    return _executable("go") or _executable("/usr/lib/go/bin/go")


def find_litellm(option: str | None) -> str | None:
    """``--litellm PATH``, else $LITELLM_BIN, else the default path; ``none`` disables."""
    path = option or os.environ.get("LITELLM_BIN") or DEFAULT_LITELLM
    return None if path == "none" else _executable(path)


def remove_tree(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


async def start_manager(
    procs: Processes,
    config: Path,
    env: Mapping[str, str] | None = None,
    name: str = "llm-manager",
    timeout: float = 60.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m llm_manager serve --port 0``; its URL comes from the log line. ``env`` is
    added to the environment (``PYTHONPATH`` to serve another checkout's code); ``name``
    names its log (one per manager)."""
    argv = [sys.executable, "-m", "llm_manager", "serve", "--config", str(config), "--port", "0"]
    proc = procs.start(name, argv, env)
    log = procs.log_path(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text(errors="replace"))
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise RuntimeError("LLM-Manager did not start:\n" + tail(log))


def manager_env(src: Path | None) -> dict[str, str]:
    """The environment that serves LLM-Manager from the checkout ``src`` (its ``src/``
    folder): ``PYTHONPATH``, checked by importing ``llm_manager`` with it. None: this one."""
    if src is None:
        return {}
    src = src.resolve()
    env = {"PYTHONPATH": str(src)}
    argv = [sys.executable, "-c", "import llm_manager; print(llm_manager.__file__)"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    found = Path(done.stdout.strip() or ".").resolve()
    if done.returncode != 0 or not found.is_relative_to(src):
        raise RuntimeError(f"llm_manager imports from {found}, not {src}:\n{done.stderr}")
    return env


NGINX_PROXY = (
    NGINX_PREAMBLE
    + """
{servers}
}}
"""
)

NGINX_SERVER = """
    upstream backend_{listen} {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://backend_{listen};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            # llama.cpp closes kept-alive connections after a few requests: send again
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
"""


def start_nginx_proxy(
    procs: Processes, nginx: str, workdir: Path, routes: Mapping[int, int]
) -> subprocess.Popen[bytes]:
    """nginx as a plain proxy, one process; ``routes`` maps listen port -> backend port."""
    folder = workdir / "nginx-proxy"
    folder.mkdir(exist_ok=True)
    servers = "".join(NGINX_SERVER.format(listen=k, backend=v) for k, v in routes.items())
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_PROXY.format(dir=folder, servers=servers))
    return procs.start("nginx", [nginx, "-p", str(folder), "-c", str(conf)])


def start_minimal_relay(procs: Processes, routes: Mapping[int, int]) -> subprocess.Popen[bytes]:
    pairs = [f"{k}=http://127.0.0.1:{v}" for k, v in routes.items()]
    return procs.start("minimal-relay", [sys.executable, str(HERE / "minimal_relay.py"), *pairs])


def start_pipe_relay(procs: Processes, routes: Mapping[int, int]) -> subprocess.Popen[bytes]:
    """benchmarks/pipe_relay.py: bytes copied, no HTTP; ``routes``: listen -> backend port."""
    pairs = [f"{k}={v}" for k, v in routes.items()]
    return procs.start("uvloop-pipe", [sys.executable, str(HERE / "pipe_relay.py"), *pairs])


GOPROXY_SRC = HERE / "goproxy"
GOPROXY_BIN = GOPROXY_SRC / ".bin" / "goproxy"  # git-ignored


def build_goproxy(go: str) -> Path:
    """``benchmarks/goproxy`` built with ``go`` into GOPROXY_BIN, again when a source file is
    newer than the binary. Standard library only: nothing is downloaded (GOPROXY=off); the
    build cache is the user's GOCACHE when set, else a folder under the temp dir."""
    sources = [*GOPROXY_SRC.glob("*.go"), GOPROXY_SRC / "go.mod"]
    newest = max(f.stat().st_mtime for f in sources)
    if GOPROXY_BIN.exists() and GOPROXY_BIN.stat().st_mtime >= newest:
        return GOPROXY_BIN
    cache = Path(tempfile.gettempdir()) / f"llm-manager-bench-go-{os.getuid()}"
    env = {
        **os.environ,
        "CGO_ENABLED": "0",  # no C compiler needed; Go's own resolver
        "GOPROXY": "off",
        "GOTOOLCHAIN": "local",
        "GOCACHE": os.environ.get("GOCACHE") or str(cache / "cache"),
        "GOPATH": os.environ.get("GOPATH") or str(cache / "path"),
    }
    GOPROXY_BIN.parent.mkdir(exist_ok=True)
    partial = GOPROXY_BIN.with_name(f"goproxy.{os.getpid()}.tmp")  # concurrent builds
    argv = [go, "build", "-trimpath", "-o", str(partial), "."]
    try:
        done = subprocess.run(
            argv, cwd=GOPROXY_SRC, env=env, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"go build ran past {exc.timeout:g} s") from exc
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"go build failed ({done.returncode}):\n{done.stderr[-2000:]}")
    partial.replace(GOPROXY_BIN)
    return GOPROXY_BIN


def start_goproxy(
    procs: Processes, exe: Path, routes: Mapping[int, int]
) -> subprocess.Popen[bytes]:
    """The Go ReverseProxy, one process; ``routes`` maps listen port -> backend port."""
    pairs = [f"{k}=http://127.0.0.1:{v}" for k, v in routes.items()]
    return procs.start("go-proxy", [str(exe), *pairs])


def start_litellm(
    procs: Processes, exe: str, workdir: Path, port: int, backends: Mapping[str, int]
) -> subprocess.Popen[bytes]:
    """LiteLLM's proxy, one worker, with one ``openai/NAME`` entry per backend."""
    model_list = [
        {
            "model_name": name,
            "litellm_params": {
                "model": f"openai/{name}",
                "api_base": f"http://127.0.0.1:{backend}/v1",
                "api_key": "x",
            },
        }
        for name, backend in backends.items()
    ]
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({"model_list": model_list}, indent=1))  # JSON is YAML
    argv = [exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": LITELLM_KEY}
    return procs.start("litellm", argv, env)


# --------------------------------------------------------------------------- the machine


def _first_line(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _litellm_version(exe: str | None) -> str | None:
    if exe is None:
        return None
    venv = Path(exe).resolve().parent.parent
    found = glob.glob(str(venv / "lib" / "python*" / "site-packages" / "litellm-*.dist-info"))
    return Path(found[0]).name.removeprefix("litellm-").removesuffix(".dist-info") if found else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _git_commit(src: Path) -> str | None:
    """The commit of the checkout whose ``src`` folder is served, and whether it is changed."""
    head = _first_line(["git", "-C", str(src), "rev-parse", "--short", "HEAD"])
    if head is None:
        return None
    dirty = _first_line(["git", "-C", str(src), "status", "--porcelain", "--", "."])
    return head + (" + uncommitted changes in src/" if dirty else "")


def machine(
    nginx: str | None,
    wrk: str | None,
    litellm: str | None,
    manager_src: Path | None = None,
    go: str | None = None,
) -> dict[str, object]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "llm_manager": _package_version("llm-manager"),
        "git": _git_commit(manager_src or ROOT / "src"),
        "manager_src": str(manager_src.resolve()) if manager_src else None,
        "xllamacpp": _package_version("xllamacpp"),
        "aiohttp": _package_version("aiohttp"),
        "nginx": (_first_line([nginx, "-v"]) or "?").removeprefix("nginx version: ")
        if nginx
        else None,
        "wrk": " ".join((_first_line([wrk, "-v"]) or "?").split()[:2]) if wrk else None,
        "litellm": _litellm_version(litellm),
        "go": (_first_line([go, "version"]) or "?").removeprefix("go version ") if go else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
