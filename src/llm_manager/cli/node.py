"""``llm-manager node``: join this machine to the cluster (docs/cluster.md).

It wraps ``ray start``: the node's devices are read with the manager's own providers and
advertised (GPU count, names and memory as labels), its declared devices are handed to
the node's agent through the raylet's environment, and its name and labels are what
schemes choose nodes by (``nodes:``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_manager.cluster.actors import DEVICES_ENV
from llm_manager.cluster.nodes import NAME_LABEL
from llm_manager.cluster.ray_backend import auth_environment
from llm_manager.config import DeviceConfig
from llm_manager.devices.base import Device
from llm_manager.devices.cuda import CudaProvider

# Ray's label values: letters, digits, '-', '_', '.', at most 63 characters.
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")


class NodeProblem(ValueError):
    pass


@dataclass(frozen=True)
class NodePlan:
    argv: list[str]
    env: dict[str, str]  # added to this environment for ray start
    gpus: list[Device]
    declared: list[DeviceConfig]


def parse_device(text: str, position: int) -> DeviceConfig:
    """``NAME:MIB[:INDEX]``: a GPU that cannot be probed (its index is its CUDA index)."""
    parts = text.rsplit(":", 2)
    if len(parts) == 3 and parts[2].isdigit() and parts[1].isdigit():
        name, mib, index = parts[0], int(parts[1]), int(parts[2])
    else:
        name, _, raw = text.rpartition(":")
        if not name or not raw.isdigit():
            raise NodeProblem(f"--device {text!r}: write NAME:MIB or NAME:MIB:INDEX")
        mib, index = int(raw), position
    return DeviceConfig(name=name, kind="cuda", memory_total_mib=mib, index=index, online=True)


def parse_label(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key or not _LABEL_VALUE.match(value):
        raise NodeProblem(
            f"--label {text!r}: write KEY=VALUE, the value in letters, digits, '-', '_', '.'"
        )
    return key, value


def plan(
    *,
    address: str | None,
    head: bool,
    port: int,
    name: str | None,
    labels: Sequence[str],
    devices: Sequence[str],
    token_file: str | None,
    block: bool,
    probed: Sequence[Device] | None = None,
    extra: Sequence[str] = (),
) -> NodePlan:
    """The ``ray start`` command that joins (or, with ``head``, starts) the cluster."""
    if head == (address is not None):
        raise NodeProblem("give either --address HEAD:PORT (join) or --head (start a cluster)")
    declared = [parse_device(text, i) for i, text in enumerate(devices)]
    gpus = list(probed) if probed is not None else _probe_gpus()
    own: dict[str, str] = dict(parse_label(text) for text in labels)
    if name is not None:
        if not _LABEL_VALUE.match(name):
            raise NodeProblem(f"--name {name!r}: letters, digits, '-', '_', '.'")
        own[NAME_LABEL] = name
    count = len(gpus) + len(declared)
    memory = [d.memory_total for d in gpus] + [d.memory_total_mib for d in declared]
    own["llm-manager/gpus"] = str(count)
    if memory:
        own["llm-manager/gpu-mib"] = str(min(memory))  # the smallest GPU's memory
    names = [d.name for d in gpus] + [d.name for d in declared]
    if names:  # the first GPU's name, in the letters a label value may hold
        own["llm-manager/gpu-name"] = re.sub(r"[^A-Za-z0-9_.-]+", "-", names[0]).strip("-._")[:63]
    beside = Path(sys.executable).with_name("ray")  # the venv's, when it is not on PATH
    ray = str(beside) if beside.is_file() else shutil.which("ray") or "ray"
    argv = [ray, "start"]
    argv += ["--head", "--port", str(port)] if head else ["--address", address or ""]
    argv += ["--num-gpus", str(count)]
    argv += ["--labels", ",".join(f"{k}={v}" for k, v in own.items())]
    if block:
        argv.append("--block")
    argv += extra  # ray start's own options, as given after --
    env = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    env.update(auth_environment(token_file))
    if declared:
        env[DEVICES_ENV] = json.dumps([d.model_dump() for d in declared])
    return NodePlan(argv, env, gpus, declared)


def _probe_gpus() -> list[Device]:
    report = CudaProvider().probe()
    return list(report.devices) if report.online else []


def describe(node: NodePlan) -> list[str]:
    lines = [f"GPU {d.index}: {d.name}, {d.memory_total} MiB (NVML)" for d in node.gpus]
    lines += [
        f"GPU {d.index}: {d.name}, {d.memory_total_mib} MiB (declared)" for d in node.declared
    ]
    return lines or ["no GPU: CPU and system memory only"]


def merged_env(node: NodePlan, base: Mapping[str, str]) -> dict[str, str]:
    env = dict(base)
    env.update(node.env)
    return env
