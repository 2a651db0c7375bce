"""Configuration: pydantic models, YAML loading with line numbers, cross-field checks.

Every problem in a file is reported at once, each with its YAML path
(``models.qwen.schemes.gpu.devices``) and line, so a user fixes a config in one pass.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> float:
    """``90s``, ``5m``, ``1h``, ``250ms`` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like 90s, 5m, 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration (use 90s, 5m, 1h or seconds)")
        unit = match.group(2).lower() if match.group(2) else None
        seconds = float(match.group(1)) * _UNIT_SECONDS[unit]
    else:
        raise ValueError("a duration is a number of seconds or a string like 90s, 5m, 1h")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]

# Memory sizes (a scheme's ``devices``): a bare number is MiB; a unit follows GNU
# coreutils (``df``, ``dd``, ``numfmt``): K, M, G, T and KiB, MiB, GiB, TiB are powers of
# 1024; KB, MB, GB, TB powers of 1000. Units ignore case. Rounded up to whole MiB: a
# requirement is never understated.
_MIB = 1024 * 1024
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS: dict[str, int] = {"b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    for _suffix in ("", "i", "ib"):
        _SIZE_UNITS[_letter + _suffix] = 1024**_power
    _SIZE_UNITS[_letter + "b"] = 1000**_power
SIZE_HELP = (
    "write MiB as a whole number (800), or a number and a unit: 800MiB, 8GiB, 1.5G "
    "(K, M, G, T, KiB, MiB, GiB, TiB: powers of 1024) or 800MB (KB, MB, GB, TB: powers of 1000)"
)


def parse_mib(value: object) -> object:
    """``800``, ``800MiB``, ``8GiB``, ``1.5G``, ``800MB`` -> whole MiB (rounded up).

    Whole numbers are passed on (the field's own checks judge them, a negative one
    included); anything else that is not a size says how to write one.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a memory size: {SIZE_HELP}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, float) and math.isfinite(value):
        raise ValueError(f"{value!r}: a size without a unit is whole MiB; {SIZE_HELP}")
    if not isinstance(value, str):
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in _SIZE_UNITS):
        raise ValueError(f"{value!r} is not a memory size: {SIZE_HELP}")
    number = float(match.group(1))
    if not unit:
        if not number.is_integer():
            raise ValueError(f"{value!r}: a size without a unit is whole MiB; {SIZE_HELP}")
        return int(number)
    return math.ceil(number * _SIZE_UNITS[unit] / _MIB)


MemoryMiB = Annotated[
    int,
    BeforeValidator(parse_mib),
    Field(ge=0),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*[a-zA-Z]*\s*$"},
            ],
            "description": "MiB as a number, or a size with a unit: 800MiB, 8GiB, 1.5G, 800MB.",
        }
    ),
]
AUTO = "auto"


def parse_need(value: object) -> object:
    """A scheme's memory on one device: a size (see parse_mib), or ``auto`` (or nothing
    written after the key): measured at earlier runs, else estimated (docs/memory.md)."""
    if value is None or (isinstance(value, str) and value.strip().casefold() == AUTO):
        return AUTO
    try:
        mib = parse_mib(value)
    except ValueError as exc:
        raise ValueError(f"{exc}; or auto to use what earlier runs measured") from None
    if isinstance(mib, int) and not isinstance(mib, bool) and mib < 0:
        raise ValueError("Input should be greater than or equal to 0")
    return mib


# Checked whole by parse_need (a union would report each of its branches' complaints).
MemoryNeed = Annotated[
    int | str,
    BeforeValidator(parse_need),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {
                    "type": "string",
                    "pattern": r"^\s*((\d+(\.\d*)?|\.\d+)\s*[a-zA-Z]*|[aA][uU][tT][oO])\s*$",
                },
                {"type": "null"},
            ],
            "description": "MiB as a number, a size with a unit (800MiB, 8GiB, 1.5G, 800MB), "
            "or auto (or empty): measured at earlier runs, else estimated.",
        }
    ),
]

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")


@dataclass(frozen=True)
class Amount:
    """MiB, or a percentage of something (a device's total, a measured peak)."""

    mib: int = 0
    percent: float = 0.0

    def of(self, base: float) -> int:
        """The amount for a base of ``base`` MiB, rounded up."""
        return self.mib if not self.percent else math.ceil(base * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent else f"{self.mib} MiB"


def parse_amount(value: object) -> Amount:
    """``10%`` or a size (``512``, ``512MiB``, ``1GiB``) -> Amount."""
    if isinstance(value, Amount):
        return value
    if isinstance(value, str) and (match := _PERCENT_RE.match(value)):
        percent = float(match.group(1))
        if percent >= 100:
            raise ValueError(f"{value!r}: a percentage must be below 100%")
        return Amount(percent=percent)
    mib = parse_mib(value)
    if not isinstance(mib, int) or isinstance(mib, bool) or mib < 0:
        raise ValueError(f"{value!r} is not a size or a percentage (10%, 512MiB, 1GiB)")
    return Amount(mib=mib)


AmountField = Annotated[
    Amount,
    BeforeValidator(parse_amount),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string"},
            ],
            "description": "MiB, a size with a unit (512MiB, 1GiB) or a percentage (10%).",
        }
    ),
]


def _headroom_form(value: object) -> object:
    # A single value is short for every accelerator (system memory has its own entry, cpu).
    if isinstance(value, dict) or value is None:
        return value or {}
    return {"gpu": value}


Mode = Literal["chat", "base", "embedding", "reranker"]
MODE_LABELS: dict[str, str] = {
    "chat": "Chat",
    "base": "Base",
    "embedding": "Embedding",
    "reranker": "Reranker",
}
PLACEHOLDERS = ("port", "name", "alias", "host", "data_dir")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    """The ``server:`` section."""

    host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the HTTP server (0 = any).")
    data_dir: Path = Field(
        Path("./data"), description="Directory for the SQLite database and run state."
    )
    idle_timeout: Duration = Field(
        3600.0, description="Stop a model unused this long (seconds or 90s/5m/1h); 0 = never."
    )
    startup_timeout: Duration = Field(
        300.0, gt=0, description="Start to ready, else the model fails and its process is killed."
    )
    stop_timeout: Duration = Field(
        10.0, description="SIGTERM grace period before SIGKILL to the model's process group."
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Keys for /v1/* and forwarded requests (Bearer or x-api-key).",
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Keys for management writes, /metrics and /ui (default: api_keys).",
    )
    connect_timeout: Duration = Field(
        10.0, gt=0, description="Connecting to a running model server, else 502."
    )
    read_timeout: Duration = Field(
        600.0,
        gt=0,
        description="Longest wait for the model server's next bytes (first byte included), "
        "else 504 (or the stream ends).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (CORS); empty = off.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the server answers to besides loopback names and "
        "server.host (a LAN name, a proxy's public name); '*.lan' for subdomains, '*' for "
        "any. Other Host headers get 403 (docs/security.md).",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        from llm_manager.web_guard import normalize_host_entry  # standard library only

        names, problems = [], []
        for entry in value:
            try:
                names.append(normalize_host_entry(entry))
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return names

    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Largest accepted request body; larger gets 413."
    )
    log_buffer_lines: int = Field(
        5000, ge=10, description="Lines of each model's log kept in memory (history)."
    )
    log_retention: Duration = Field(
        7 * 86400.0, description="Delete stored log lines older than this; 0 = keep forever."
    )
    log_max_lines: int = Field(
        100_000, ge=0, description="Stored log lines per model, newest kept; 0 = no limit."
    )
    language: Literal["en", "zh"] = Field("en", description="Language of human-readable messages.")
    queue_timeout: Duration = Field(
        600.0,
        gt=0,
        description="Longest a request waits for its model to get room on its devices (the "
        "models holding them busy) before 503 with Retry-After.",
    )
    turn_time: Duration = Field(
        30.0,
        description="Once another model waits for a loaded model's memory, the loaded model "
        "takes new requests for at most this long (its turn), then finishes what it has and "
        "is swapped out.",
    )
    turn_linger: Duration = Field(
        0.5,
        description="A loaded model whose memory another model waits for is swapped out once "
        "it has had no request in flight this long, even before its turn ends.",
    )
    stream_keepalive: Duration = Field(
        0.0,
        description="While a streamed request waits for its model, send an SSE comment line "
        "this often to keep the client's connection alive; 0 = off.",
    )
    memory_margin: AmountField = Field(
        Amount(percent=10.0),
        description="Added to a measured or estimated footprint when a scheme's memory is "
        "auto (a percentage of it, or MiB).",
    )
    measured_raises_declared: bool = Field(
        False,
        description="Plan with the measured peak (plus memory_margin) where it is above the "
        "MiB a scheme declares; off: declared numbers always win.",
    )
    memory_headroom: Annotated[dict[str, AmountField], BeforeValidator(_headroom_form)] = Field(
        default_factory=dict,
        description="Memory kept free on each device, never planned for: MiB or a "
        "percentage of the device's total; one value for every GPU, or per device key "
        "(gpu = every accelerator, cpu = system memory, cuda:N, a name).",
    )
    ollama_api: bool = Field(
        True, description="Serve the Ollama API (/api/tags, /api/chat...; docs/api.md)."
    )
    ollama_keep_alive_min: Duration = Field(
        0.0,
        description="Floor of an Ollama request's keep_alive (0 lets a client unload a "
        "model after its answer with keep_alive 0).",
    )
    ollama_keep_alive_max: Duration = Field(
        3600.0,
        description="Ceiling of an Ollama request's keep_alive; a longer one, or a negative "
        "one (keep forever), is cut to this; 0 = no ceiling (clients may pin a model).",
    )

    @model_validator(mode="after")
    def _keep_alive_range(self) -> ServerConfig:
        top = self.ollama_keep_alive_max
        if top and self.ollama_keep_alive_min > top:
            raise ValueError("ollama_keep_alive_min is above ollama_keep_alive_max")
        return self


class DeviceConfig(_Strict):
    """A device declared by hand, for hardware that cannot be probed (and for tests)."""

    name: str = Field(min_length=1, description="Name matched by scheme device keys.")
    kind: Literal["cuda", "amd", "other"] = Field(
        "cuda",
        description="Device family, used to group it in /api/devices/info. System memory "
        "is always probed (key `cpu`), so it is not declared.",
    )
    memory_total_mib: int = Field(ge=0, description="Memory of the device in MiB.")
    index: int | None = Field(
        None,
        ge=0,
        description="GPU index: makes `cuda:N` match it and sets CUDA_VISIBLE_DEVICES.",
    )
    online: bool = Field(True, description="Whether the device is present.")


def _device_key(key: str) -> str:
    # Checked per key (not on the whole mapping) so that a bad key is reported together
    # with bad sizes in the same mapping, each at its own line.
    if not key.strip():
        raise ValueError("a device key cannot be empty")
    family, colon, index = key.strip().partition(":")
    if colon:
        if family.lower() not in ("cuda", "amd"):
            raise ValueError(f"unknown device key {key!r}: use cpu, cuda:N, amd:N or a device name")
        if not index.isdigit():
            raise ValueError(f"device key {key!r}: use {family.lower()}:N with N a GPU index")
    return key


DeviceKey = Annotated[str, AfterValidator(_device_key)]


HOOK_TIMEOUT = 30.0  # seconds a hook or stop_command may run unless it sets its own timeout


def _hook_form(value: object) -> object:
    # A bare command (string or list) is short for {command: ...}.
    if isinstance(value, str | list):
        return {"command": value}
    return value


class _HookSpec(_Strict):
    """A command run at a point of a model's start or stop."""

    command: str | list[str] = Field(
        description="Command line (split like a shell line, run without a shell)."
    )
    timeout: Duration = Field(
        HOOK_TIMEOUT,
        gt=0,
        description="Seconds it may run; past it its process group is killed (a failure).",
    )

    @field_validator("command")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("the command is an empty list")
        if isinstance(value, str) and not value.strip():
            raise ValueError("the command is empty")
        return value


HookCommand = Annotated[_HookSpec, BeforeValidator(_hook_form)]


class HooksConfig(_Strict):
    """A scheme's hooks: each a command (string or list) or {command, timeout}."""

    before_start: HookCommand | None = Field(
        None, description="Before the process starts; failing fails the start."
    )
    after_start: HookCommand | None = Field(
        None, description="Once the model is ready, before it routes; failing fails the start."
    )
    before_stop: HookCommand | None = Field(
        None, description="At every stop, before stop_command and the signals; failure logged."
    )
    after_stop: HookCommand | None = Field(
        None, description="At every stop, once the process group is gone; failure logged."
    )

    @field_validator("before_start")
    @classmethod
    def _no_pid(cls, value: _HookSpec | None) -> _HookSpec | None:
        if value is not None and "{pid}" in str(value.command):
            raise ValueError("before_start runs before there is a process: {pid} is unknown")
        return value


class SchemeConfig(_Strict):
    """One way to start a model on one combination of devices."""

    devices: dict[DeviceKey, MemoryNeed] = Field(
        default_factory=dict,
        description="Device key -> MiB the model needs there (0 = must be present); "
        "a number is MiB, or a size such as 8GiB, 1.5G or 800MB; auto (or empty) = "
        "measured at earlier runs, else estimated from the GGUF (docs/memory.md).",
    )
    command: str | list[str] | None = Field(
        None, description="Command line (split like a shell line, run without a shell)."
    )
    script: str | None = Field(None, description="A script file to run instead of a command.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    cwd: str | None = Field(None, description="Working directory of the process.")
    stop_command: HookCommand | None = Field(
        None,
        description="Run at every stop before the signals (docker stop llm-{name}); "
        "placeholders as in command plus {pid}; then SIGTERM/SIGKILL end whatever is left.",
    )
    hooks: HooksConfig = Field(
        default_factory=HooksConfig,  # type: ignore[arg-type]
        description="Commands run before/after start and before/after stop.",
    )
    nodes: dict[str, str] = Field(
        default_factory=dict,
        description="Cluster mode: labels a node must carry for this scheme to run there "
        "(llm-manager node --label KEY=VALUE; 'node' is the node's name).",
    )

    @model_validator(mode="after")
    def _one_launcher(self) -> SchemeConfig:
        problem = _launcher_problem(self.command, self.script)
        if problem:
            raise ValueError(problem)
        return self


def _launcher_problem(command: object, script: object) -> str | None:
    if (command is None) == (script is None):
        return "a scheme needs exactly one of 'command' or 'script'"
    if isinstance(command, list) and not command:
        return "'command' is an empty list"
    if isinstance(command, str) and not command.strip():
        return "'command' is empty"
    return None


class ModelConfig(_Strict):
    """One managed model: its names, mode, and the schemes that start it."""

    aliases: list[str] = Field(default_factory=list, description="Other names of the model.")
    mode: Mode = Field("chat", description="chat | base | embedding | reranker.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Port the model serves on; free port when omitted."
    )
    auto_start: bool = Field(False, description="Start at manager start and restart-autostart.")
    idle_timeout: Duration | None = Field(
        None, description="Per-model override of server.idle_timeout."
    )
    health_path: str = Field("/health", description="Readiness probe path; 200 means ready.")
    max_concurrency: int = Field(
        0, ge=0, description="0 = unlimited; above it requests wait in a queue."
    )
    max_queue: int = Field(
        100, ge=0, description="Requests that may wait for a slot; beyond it 429."
    )
    pinned: bool = Field(
        False, description="Never evicted for another model, and never stopped for being idle."
    )
    priority: int = Field(
        0,
        description="Lower priorities are evicted first; higher ones get room first when "
        "several models wait.",
    )
    queue_timeout: Duration | None = Field(
        None, gt=0, description="Per-model override of server.queue_timeout."
    )
    turn_time: Duration | None = Field(None, description="Per-model override of server.turn_time.")
    schemes: dict[str, SchemeConfig] = Field(
        min_length=1, description="Start schemes, tried in order."
    )

    @field_validator("health_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("health_path must start with '/'")
        return value


class ClusterConfig(_Strict):
    """Cluster mode (docs/cluster.md): engines placed on the nodes of a Ray cluster."""

    backend: Literal["ray"] = Field("ray", description="The cluster engine (only Ray).")
    address: str = Field(
        "auto",
        min_length=1,
        description="The Ray cluster to join: HOST:PORT of its head, or auto (the cluster "
        "started on this machine with ray start / llm-manager node --head).",
    )
    namespace: str = Field(
        "llm-manager", min_length=1, description="Ray namespace of the manager's actors."
    )
    auth_token_file: str | None = Field(
        None,
        description="File holding the cluster's token (Ray's token authentication, "
        "RAY_AUTH_MODE=token); none = the cluster has no authentication.",
    )
    connect_timeout: Duration = Field(
        60.0, gt=0, description="How long the manager waits to join the cluster at start."
    )
    probe_timeout: Duration = Field(
        2.0,
        gt=0,
        description="How long a node's device reading may take before the node "
        "is left out of placement (a node's first reading, its agent just started: "
        "connect_timeout).",
    )
    replicas: bool = Field(
        False,
        description="This manager is one of several gateway replicas: the models are run "
        "by one controller in the cluster that every replica shares (docs/replicas.md). "
        "Needs a shared store (store: postgresql://...).",
    )


class Config(_Strict):
    """The whole configuration file."""

    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    devices: list[DeviceConfig] = Field(default_factory=list)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    cluster: ClusterConfig | None = Field(
        None, description="Cluster mode: without it every model runs on this machine."
    )
    store: str | None = Field(
        None,
        description="Where records and logs are kept: a PostgreSQL URL "
        "(postgresql://user:password@host/db); none = the SQLite file in server.data_dir.",
    )

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("store must be a PostgreSQL URL: postgresql://user@host/db")
        return value

    @model_validator(mode="after")
    def _cluster_rules(self) -> Config:
        if self.cluster is not None and self.devices:
            raise ValueError(
                "'devices' declares this machine's devices; in cluster mode every node "
                "declares its own (llm-manager node --device NAME:MIB)"
            )
        if self.cluster is not None and self.cluster.replicas and self.store is None:
            raise ValueError(
                "cluster.replicas shares the models between gateway replicas; their records "
                "must be shared too: set store: postgresql://... (docs/replicas.md)"
            )
        if self.cluster is None:
            for name, model in self.models.items():
                for scheme_name, scheme in model.schemes.items():
                    if scheme.nodes:
                        raise ValueError(
                            f"models.{name}.schemes.{scheme_name}.nodes chooses cluster "
                            "nodes, but there is no 'cluster' section"
                        )
        return self


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path or '<root>'}" + (f" (line {self.line})" if self.line else "")
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` lists every reason."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration {source}: {len(problems)} problem(s)\n{lines}")


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    source: str  # file path, or "built-in quick-start configuration"
    base_dir: Path  # relative script/cwd paths resolve here


# --- YAML with line numbers -------------------------------------------------------------


# Both walks skip a node already being walked above them: a YAML alias can refer to one of
# its own ancestors (``a: &x [*x]``), which would otherwise recurse without end.


def _node_lines(
    node: yaml.Node,
    path: tuple[str, ...],
    out: dict[tuple[str, ...], int],
    active: frozenset[int] = frozenset(),
) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if id(node) in active:
        return
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            out[(*path, key)] = key_node.start_mark.line + 1
            _node_lines(value_node, (*path, key), out, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_lines(item, (*path, str(i)), out, active)


def _duplicate_keys(
    node: yaml.Node, path: tuple[str, ...], active: frozenset[int] = frozenset()
) -> Iterator[ConfigProblem]:
    if id(node) in active:
        return
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                yield ConfigProblem(
                    ".".join((*path, key)), key_node.start_mark.line + 1, "duplicate key"
                )
            seen.add(key)
            yield from _duplicate_keys(value_node, (*path, key), active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*path, str(i)), active)


def _line_for(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    # Walk up until a node that exists in the file (a missing key reports its parent's line).
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        path = path[:-1]


def _is_tag(part: str) -> bool:
    """Loc parts pydantic adds that are not YAML keys (union branches, key validation)."""
    return part in ("str", "int", "list[str]", "[key]") or part.startswith("function-")


def _format_pydantic(
    error: Any, lines: dict[tuple[str, ...], int] | None = None
) -> tuple[tuple[str, ...], str]:
    known = lines or {}
    loc: tuple[str, ...] = ()
    # Union branches and Annotated wrappers add loc parts that are not YAML keys. A part
    # that names a key present in the file is always kept, so that a model called
    # "stream-llm" or a device key "strix halo" is not cut out of the path.
    for part in (str(p) for p in error["loc"]):
        if _is_tag(part) and (*loc, part) not in known:
            continue
        loc = (*loc, part)
    kind = error["type"]
    msg = str(error["msg"])
    if kind == "missing":
        msg = "required key is missing"
    elif kind == "extra_forbidden":
        msg = "unknown key (not part of the configuration)"
        if loc:
            meant = _did_you_mean(loc[-1], _known_keys(loc[:-1]))
            if meant:
                msg += f"; did you mean {meant!r}?"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return loc, msg


def _did_you_mean(key: str, known: list[str]) -> str | None:
    """The known key a mistyped one most likely meant: a close spelling (difflib), else a
    known key that the typed one starts with or abbreviates (``environment`` -> ``env``)."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    lowered = key.lower()
    for name in known:
        if len(name) >= 3 and (lowered.startswith(name) or name.startswith(lowered)):
            return name
    return None


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    """The keys a mapping at ``loc`` may hold (for "did you mean"); [] where free-form."""
    model: type[BaseModel] = Config
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if model is Config and part == "server":
            model = ServerConfig
        elif model is Config and part in ("devices", "models") and parts:
            parts.pop(0)  # the list index, or the model's name
            model = DeviceConfig if part == "devices" else ModelConfig
        elif model is ModelConfig and part == "schemes" and parts:
            parts.pop(0)  # the scheme's name
            model = SchemeConfig
        elif model is SchemeConfig and part == "hooks":
            model = HooksConfig
        else:
            return []
    return list(model.model_fields)


def _normalise(name: str) -> str:
    return name.casefold()


def _cross_checks(raw: dict[str, Any]) -> Iterator[tuple[tuple[str, ...], str]]:
    """Checks across entries: unique names/aliases, ports and device names; launchers."""
    devices = raw.get("devices")
    if isinstance(devices, list):
        seen_devices: set[str] = set()
        for i, device in enumerate(devices):
            dname = device.get("name") if isinstance(device, dict) else None
            if isinstance(dname, str):
                if dname.casefold() in seen_devices:
                    yield (("devices", str(i), "name"), f"device {dname!r} is declared twice")
                seen_devices.add(dname.casefold())
    models = raw.get("models")
    if not isinstance(models, dict):
        return
    owners: dict[str, str] = {}
    ports: dict[int, str] = {}
    server = raw.get("server")
    server_port = server.get("port", 8080) if isinstance(server, dict) else 8080
    if isinstance(server_port, int) and server_port:
        ports[server_port] = "the server itself (server.port)"
    for name, model in models.items():
        name = str(name)
        names: list[tuple[tuple[str, ...], str]] = [(("models", name), name)]
        if isinstance(model, dict):
            aliases = model.get("aliases")
            if isinstance(aliases, list):
                names += [
                    (("models", name, "aliases", str(i)), str(a)) for i, a in enumerate(aliases)
                ]
            schemes = model.get("schemes")
            if isinstance(schemes, dict):
                # Also checked by SchemeConfig; repeated on the raw data because pydantic
                # skips a model validator when a field of the same scheme is invalid, and
                # every problem must be reported in one pass (duplicates are dropped).
                for scheme_name, scheme in schemes.items():
                    if isinstance(scheme, dict):
                        problem = _launcher_problem(scheme.get("command"), scheme.get("script"))
                        if problem:
                            yield (("models", name, "schemes", str(scheme_name)), problem)
            port = model.get("port")
            if isinstance(port, int) and not isinstance(port, bool):
                if port in ports:
                    yield (
                        ("models", name, "port"),
                        f"port {port} is already used by {ports[port]}",
                    )
                else:
                    ports[port] = repr(name)
        for loc, alias in names:
            key = _normalise(alias)
            if not alias.strip():
                yield (loc, "a model name or alias cannot be empty")
            elif key == "all-models":
                yield (loc, "'all-models' is reserved by the API")
            elif key in owners:
                yield (loc, f"name {alias!r} is already used by model {owners[key]!r}")
            else:
                owners[key] = name


def validate_data(raw: Any, source: str, lines: dict[tuple[str, ...], int]) -> Config:
    problems: list[ConfigProblem] = []
    config: Config | None = None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigProblem("", 1, "the file must hold a mapping")])
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc, msg = _format_pydantic(err, lines)
            problems.append(ConfigProblem(".".join(loc), _line_for(lines, loc), msg))
    for loc, msg in _cross_checks(raw):
        problems.append(ConfigProblem(".".join(loc), _line_for(lines, loc), msg))
    if config is not None and not problems:
        # Imported here: the check needs the planner, which itself depends on this module.
        from llm_manager.models.pinning import pinned_problems

        for loc, msg in pinned_problems(config):
            problems.append(ConfigProblem(".".join(loc), _line_for(lines, loc), msg))
    if problems or config is None:
        problems.sort(key=lambda p: (p.line or 0, p.path))
        raise ConfigError(source, _dedupe(problems))
    return config


def _dedupe(problems: Iterable[ConfigProblem]) -> list[ConfigProblem]:
    seen: set[ConfigProblem] = set()
    out = []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def parse_text(text: str, source: str) -> Config:
    """Validate YAML text; raises ConfigError listing every problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            source, [ConfigProblem("", line, f"YAML syntax error: {reason}")]
        ) from None
    lines: dict[tuple[str, ...], int] = {}
    dupes: list[ConfigProblem] = []
    if node is not None:
        _node_lines(node, (), lines)
        dupes = list(_duplicate_keys(node, ()))
    try:
        config = validate_data(raw, source, lines)
    except ConfigError as exc:
        raise ConfigError(source, dupes + exc.problems) from None
    if dupes:
        raise ConfigError(source, dupes)
    return config


def load_file(path: Path) -> LoadedConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            str(path), [ConfigProblem("", None, f"cannot read file: {exc}")]
        ) from None
    config = parse_text(text, str(path))
    return LoadedConfig(config=config, source=str(path), base_dir=path.resolve().parent)


def json_schema() -> str:
    return json.dumps(Config.model_json_schema(), indent=2)
