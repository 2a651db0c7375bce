"""Turning a scheme into an argv, environment and working directory; port checks."""

from __future__ import annotations

import errno
import os
import re
import secrets
import shlex
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llm_manager.config import SchemeConfig
from llm_manager.errors import StartFailed

UPSTREAM_HOST = "127.0.0.1"
_PLAIN = re.compile(r"[\w./:{}=,@%+-]+")
API_KEY = "{api_key}"


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    # The placeholder values of this start ({port}, {name}, ...), for its hooks and
    # stop_command.
    values: dict[str, str] = field(default_factory=dict)
    script: bool = False  # argv is [the scheme's script]
    # The start's own key when the scheme passes {api_key} to the engine (llama-server
    # --api-key {api_key}): the relay and the probe then send it, so that an engine
    # listening on the network answers only the manager (docs/configuration.md).
    api_key: str | None = None

    @property
    def display(self) -> str:
        return shlex.join(self.argv)


def substitute(text: str, values: Mapping[str, str]) -> str:
    # Only the known placeholders are replaced, so other braces (JSON in an argument,
    # shell-like ${VAR}) pass through untouched.
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def describe(scheme: SchemeConfig) -> str:
    """The scheme's start command or script as written in the config (``current_bat_path``)."""
    if scheme.script is not None:
        return scheme.script
    if isinstance(scheme.command, list):
        # Quoted only where a shell would need it; placeholders stay readable ({port}).
        return " ".join(p if _PLAIN.fullmatch(p) else shlex.quote(p) for p in scheme.command)
    return scheme.command or ""


def new_api_key() -> str:
    """A start's own engine key: 32 hex characters (128 bits). Not token_urlsafe: one key in
    64 began with "-", and an engine's command line (``--api-key {api_key}``) read it as an
    option; llama-server and argparse-based engines then refused to start."""
    return secrets.token_hex(16)


def build(
    scheme: SchemeConfig,
    *,
    name: str,
    aliases: Sequence[str],
    port: int,
    data_dir: Path,
    base_dir: Path,
    gpu_indices: Sequence[int] = (),
    host: str = UPSTREAM_HOST,
    remote: bool = False,
) -> Launch:
    """The launch of a start. ``remote``: for a cluster node (cluster/remote.py), whose
    files this machine cannot see: the environment holds only what the manager sets
    (the node adds its own), CUDA_VISIBLE_DEVICES is always set (empty without a GPU:
    the planner gave it none), and programs and scripts are looked up there."""
    values = {
        "port": str(port),
        "name": name,
        "alias": aliases[0] if aliases else name,
        "host": host,
        "data_dir": str(data_dir),
        "api_key": new_api_key(),  # this start's own; see Launch.api_key
    }
    env = {} if remote else dict(os.environ)
    env.update(
        LLM_MANAGER_MODEL=name,
        LLM_MANAGER_PORT=str(port),
        LLM_MANAGER_HOST=host,
    )
    if (gpu_indices or remote) and "CUDA_VISIBLE_DEVICES" not in scheme.env:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_indices)
    env.update({k: substitute(v, values) for k, v in scheme.env.items()})
    cwd = str(_resolve(substitute(scheme.cwd, values), base_dir)) if scheme.cwd else None
    if scheme.script is not None:
        script = _resolve(substitute(scheme.script, values), base_dir)
        if remote:
            argv = [str(script)]  # how to run it is decided on the node (node_argv)
        elif not script.is_file():
            raise StartFailed(f"script {script} does not exist")
        else:
            argv = _script_argv(script)
    elif remote:
        argv = split_command(scheme.command or "", values)
    else:
        argv = command_argv(scheme.command or "", values, env, cwd, base_dir)
    written = [describe(scheme), scheme.cwd or "", *scheme.env.values()]
    key = values["api_key"] if any(API_KEY in text for text in written) else None
    return Launch(
        argv=argv,
        env=env,
        cwd=cwd,
        values=values,
        script=scheme.script is not None,
        api_key=key,
    )


def split_command(raw: str | Sequence[str], values: Mapping[str, str]) -> list[str]:
    """A command (a shell-like line or a list) as arguments, placeholders filled in."""
    parts = shlex.split(raw) if isinstance(raw, str) else list(raw)
    return [substitute(p, values) for p in parts]


def command_argv(
    raw: str | Sequence[str],
    values: Mapping[str, str],
    env: Mapping[str, str],
    cwd: str | None,
    base_dir: Path,
) -> list[str]:
    """A command (a shell-like line or a list) as the argv to run, placeholders filled in;
    StartFailed when its program cannot be found."""
    argv = split_command(raw, values)
    if argv[0] == "llm-manager":
        # Our own engine: run it with this interpreter, whether or not the venv's bin
        # directory is on PATH (it is not under `make run`).
        argv[:1] = [sys.executable, "-m", "llm_manager"]
    exe = argv[0]
    if os.sep in exe:
        # A relative program path is relative to the scheme's cwd, else the config's
        # directory, like a script's (not to wherever the manager was started).
        program = _resolve(exe, Path(cwd) if cwd else base_dir)
        if not program.is_file():
            raise StartFailed(f"command {str(program)!r} does not exist")
        argv[0] = str(program)
    elif shutil.which(exe, path=env.get("PATH")) is None:
        raise StartFailed(f"command {exe!r} not found on PATH")
    return argv


def node_argv(
    argv: Sequence[str], script: bool, env: Mapping[str, str], cwd: str | None
) -> list[str]:
    """A remote launch's argv as the node runs it (cluster/actors.py): its script run the
    way this machine would run it, ``llm-manager`` with the node's own interpreter, a
    program that cannot be found there said so (StartFailed)."""
    if script:
        path = Path(argv[0])
        if not path.is_file():
            raise StartFailed(f"script {path} does not exist on this node")
        return _script_argv(path)
    return command_argv(list(argv), {}, env, cwd, Path(cwd or "."))


def _resolve(path: str, base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base_dir / p


def _script_argv(script: Path) -> list[str]:
    if os.access(script, os.X_OK):
        return [str(script)]
    if script.suffix in (".sh", ".bash") and (bash := shutil.which("bash")):
        return [bash, str(script)]
    return ["/bin/sh", str(script)]


def free_port(host: str = UPSTREAM_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_port_free(port: int, host: str = UPSTREAM_HOST) -> None:
    """Fail fast when another program listens on the model's port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR lets the bind succeed over TIME_WAIT leftovers of our own
        # earlier run, while a live listener still makes it fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartFailed(
                    f"port {port} is already in use by another program",
                    f"free port {port} or change the model's port",
                ) from None
            raise StartFailed(f"cannot use port {port}: {exc.strerror}") from None
