"""Converting the original LLM-Manager's ``config.json`` into this project's YAML.

The original format (github.com/lingyezhixing/LLM-Manager, ``config.json``) has a
``program`` section and then one key per model::

    {
      "program": {"host": "0.0.0.0", "port": 8080, "alive_time": 60, "log_level": "DEBUG", ...},
      "Qwen3-Coder-30B": {
        "aliases": ["Qwen3-Coder"], "mode": "Chat", "port": 10001, "auto_start": false,
        "RTX4060-V100": {
          "required_devices": ["rtx 4060", "v100"],
          "bat_path": "Model_startup_script\\\\Qwen3-Coder.bat",
          "memory_mb": {"rtx 4060": 6144, "v100": 16000}
        }
      }
    }

Every key of a model that holds an object with ``required_devices`` (or one of the other
scheme keys) is a scheme, tried in file order, as here. Older files name the server
``openai_host``/``openai_port``, and older still the schemes' keys ``required_gpus`` and
``gpu_mem_mb``; newer ones have ``script_path`` instead of ``bat_path``. All are read.

:func:`convert` is pure: it takes the parsed JSON and returns the YAML text and a report
of everything that was not carried over, or was carried over with a change worth
knowing. Nothing is dropped without an entry in the report.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from llm_manager.config import ConfigError, parse_text

RESERVED_NAME = "all-models"

# Keys of the original's ``program`` section (compared ignoring case) that have no
# counterpart here, and why.
_PROGRAM_DROPPED: dict[str, str] = {
    "log_level": "no configuration key: use `llm-manager serve --log-level`",
    "disable_gpu_monitoring": (
        "no such switch: NVIDIA GPUs are probed through NVML when present; "
        "devices that cannot be probed can be declared under `devices:`"
    ),
    "device_plugin_dir": (
        "no plugins: NVIDIA, AMD and CPU devices are probed by the manager itself; "
        "others can be declared under `devices:`"
    ),
    "interface_plugin_dir": (
        "no plugins: the mode (chat, base, embedding, reranker) decides which endpoints "
        "a model serves"
    ),
    "webui_host": "no separate web UI server: the manager serves everything on server.port",
    "webui_port": "no separate web UI server: the manager serves everything on server.port",
    "webui_backend_host": "no separate backend: the management API is on server.port",
    "webui_backend_port": "no separate backend: the management API is on server.port",
    "tokentracker": "no such setting: the tokens of every forwarded request are recorded",
    "claude_settings_path": "no equivalent in this project",
}
_HOST_KEYS = ("host", "openai_host")
_PORT_KEYS = ("port", "openai_port")

# Top-level keys of the original that are not models.
_TOP_DROPPED: dict[str, str] = {
    "wake_on_lan": "no equivalent in this project",
    "claude_configs": "no equivalent in this project",
    "remote-models": "remote models are not managed by this project",
}
_LOCAL_MODELS = "local-models"

_MODEL_KEYS = ("aliases", "mode", "port", "auto_start", "alive_time")
_SCHEME_MARKERS = (
    "required_devices",
    "required_gpus",
    "bat_path",
    "script_path",
    "memory_mb",
    "gpu_mem_mb",
)
_MODES = ("chat", "base", "embedding", "reranker")
_BATCH_SUFFIXES = (".bat", ".cmd")


class ImportFailed(Exception):
    """The input cannot be converted at all (not JSON, not an object)."""


@dataclass(frozen=True)
class ReportItem:
    """One thing the import did not carry over (``dropped``) or carried over with a change."""

    path: str
    reason: str
    dropped: bool = True

    def __str__(self) -> str:
        if self.dropped:
            return f"not carried over: {self.path} ({self.reason})"
        return f"note: {self.path}: {self.reason}"


class _Report:
    def __init__(self) -> None:
        self.items: list[ReportItem] = []

    def drop(self, path: str, reason: str) -> None:
        self.items.append(ReportItem(path, reason, dropped=True))

    def note(self, path: str, reason: str) -> None:
        self.items.append(ReportItem(path, reason, dropped=False))


# --- reading the JSON --------------------------------------------------------------------


def parse_json(text: str) -> tuple[dict[str, Any], list[ReportItem]]:
    """The JSON object in ``text``, and a report item for each key that appears twice in
    one object (JSON readers keep the last value). Raises :class:`ImportFailed`."""
    duplicates: list[ReportItem] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                duplicates.append(
                    ReportItem(
                        key,
                        "the key appears twice in one JSON object; only its last value was read",
                    )
                )
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise ImportFailed(
            f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise ImportFailed("not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ImportFailed(
            f"the file holds a JSON {type(data).__name__}, not an object "
            '({"program": {...}, "MODEL": {...}, ...})'
        )
    return data, duplicates


# --- values ------------------------------------------------------------------------------


def _is_number(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value) and value >= 0
    except OverflowError:  # an integer too big for a float
        return False


def _minutes(value: object) -> str | None:
    """``alive_time`` (minutes) as a duration of this project, or None when it is not one."""
    if not _is_number(value):
        return None
    assert isinstance(value, int | float)
    if not math.isfinite(float(value) * 60):
        return None  # more minutes than a duration can hold
    if float(value).is_integer():
        return f"{int(value)}m"
    seconds = f"{value * 60:.3f}".rstrip("0").rstrip(".")
    return f"{seconds}s"


def _port(value: object, low: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= 65535:
        return value
    return None


def _mib(value: object) -> tuple[int | None, bool]:
    """A memory figure as whole MiB, and whether it had to be rounded up."""
    if not _is_number(value):
        return None, False
    assert isinstance(value, int | float)
    if isinstance(value, int):
        return value, False
    rounded = math.ceil(value)
    return rounded, rounded != value


def _device_key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a scheme device key here (config.py's rule), else None."""
    if not key.strip():
        return "an empty device name"
    family, colon, index = key.strip().partition(":")
    if colon and (family.lower() not in ("cuda", "amd") or not index.isdigit()):
        return "a device key with ':' must be cuda:N or amd:N here"
    return None


def _clean(text: str) -> str:
    """A user-supplied name made safe for a one-line report or a YAML comment."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


# --- conversion --------------------------------------------------------------------------


@dataclass
class _Model:
    name: str
    path: str
    body: dict[str, Any]
    aliases: list[str]
    port: int | None
    port_path: str


def convert(
    data: dict[str, Any], source: str = "config.json", *, platform: str = sys.platform
) -> tuple[str, list[ReportItem]]:
    """The original LLM-Manager's parsed ``config.json`` -> (this project's YAML, report).

    The YAML is checked with :func:`llm_manager.config.parse_text` before it is returned;
    :class:`ImportFailed` is raised if it does not validate (which would be a bug here).
    ``platform`` decides whether Windows-only scripts get a note (``sys.platform``).
    """
    if not isinstance(data, dict):
        raise ImportFailed("the configuration must be a JSON object")
    report = _Report()
    server: dict[str, Any] = {}
    raw_models: list[tuple[str, str, object]] = []  # (name, report path, value)
    for key, value in data.items():
        key = str(key)
        folded = key.casefold()
        if folded == "program":
            if isinstance(value, dict):
                server = _program(value, report)
            else:
                report.drop("program", "not an object")
        elif folded in _TOP_DROPPED:
            report.drop(_clean(key), _TOP_DROPPED[folded])
        elif folded == _LOCAL_MODELS and isinstance(value, dict) and _holds_models(value):
            for name, model in value.items():
                raw_models.append((str(name), f"{_clean(key)}.{_clean(str(name))}", model))
        else:
            raw_models.append((key, f"models.{_clean(key)}", value))

    models: list[_Model] = []
    for name, path, value in raw_models:
        if not isinstance(value, dict):
            report.drop(path, "unknown key: not a model (a model is a JSON object)")
            continue
        model = _model(name, path, value, report, platform)
        if model is not None:
            models.append(model)

    out_models = _resolve_names(models, server, report)
    document: dict[str, Any] = {}
    if server:
        document["server"] = server
    document["models"] = out_models
    text = _header(source, report.items) + _dump(document)
    try:
        parse_text(text, source)
    except ConfigError as exc:  # pragma: no cover - a bug in this module, not bad input
        raise ImportFailed(
            "the converted configuration does not validate (please report this): " + str(exc)
        ) from None
    return text, report.items


def _holds_models(value: dict[str, Any]) -> bool:
    return any(isinstance(v, dict) for v in value.values())


def _program(program: dict[str, Any], report: _Report) -> dict[str, Any]:
    server: dict[str, Any] = {}
    by_name = {str(k).casefold(): (str(k), v) for k, v in program.items()}
    for target, keys in (("host", _HOST_KEYS), ("port", _PORT_KEYS)):
        present = [k for k in keys if k in by_name]
        for used in present[:1]:
            original, value = by_name[used]
            if target == "host":
                ok = isinstance(value, str) and bool(value.strip())
            else:
                ok = _port(value, 0) is not None
            if ok:
                server[target] = value
            else:
                report.drop(f"program.{_clean(original)}", f"{value!r} is not a valid {target}")
        for other in present[1:]:
            original, _ = by_name[other]
            report.drop(
                f"program.{_clean(original)}", f"program.{by_name[present[0]][0]} is used instead"
            )
    for folded, (original, value) in by_name.items():
        path = f"program.{_clean(original)}"
        if folded in _HOST_KEYS or folded in _PORT_KEYS:
            continue
        if folded == "alive_time":
            duration = _minutes(value)
            if duration is None:
                report.drop(path, f"{value!r} is not a number of minutes")
            else:
                server["idle_timeout"] = duration
        elif folded in _PROGRAM_DROPPED:
            report.drop(path, _PROGRAM_DROPPED[folded])
        else:
            report.drop(path, "unknown key")
    host = server.get("host")
    if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1"):
        report.note(
            "server.host",
            f"{host} with no api_keys lets anyone who can reach this machine use the "
            "models and the management API; set server.api_keys (and admin_keys)",
        )
    return server


def _model(
    name: str, path: str, raw: dict[str, Any], report: _Report, platform: str
) -> _Model | None:
    body: dict[str, Any] = {}
    aliases: list[str] = []
    port: int | None = None
    schemes: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        kpath = f"{path}.{_clean(key)}"
        if key == "aliases":
            aliases = _aliases(value, kpath, report)
        elif key == "mode":
            body["mode"] = _mode(value, kpath, report)
        elif key == "port":
            port = _port(value, 1)
            if port is None:
                report.drop(kpath, f"{value!r} is not a port number (1-65535)")
        elif key == "auto_start":
            if isinstance(value, bool):
                body["auto_start"] = value
            else:
                report.drop(kpath, f"{value!r} is not true or false")
        elif key == "alive_time":
            duration = _minutes(value)
            if duration is None:
                report.drop(kpath, f"{value!r} is not a number of minutes")
            else:
                body["idle_timeout"] = duration
        elif isinstance(value, dict) and any(m in value for m in _SCHEME_MARKERS):
            scheme = _scheme(value, kpath, report, platform)
            if scheme is not None:
                schemes[key] = scheme
        else:
            report.drop(kpath, "unknown key")
    if not schemes:
        report.drop(path, "the model has no usable scheme, so it cannot be started")
        return None
    body.setdefault("mode", "chat")
    body["schemes"] = schemes
    return _Model(name, path, body, aliases, port, f"{path}.port")


def _aliases(value: object, path: str, report: _Report) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        report.drop(path, "not a list of names")
        return []
    out = []
    for i, alias in enumerate(value):
        if isinstance(alias, str):
            out.append(alias)
        else:
            report.drop(f"{path}.{i}", f"{alias!r} is not a name")
    return out


def _mode(value: object, path: str, report: _Report) -> str:
    if isinstance(value, str) and value.strip().casefold() in _MODES:
        return value.strip().casefold()
    report.drop(path, f"unknown mode {value!r}; the model is imported as a chat model")
    return "chat"


def _scheme(
    raw: dict[str, Any], path: str, report: _Report, platform: str
) -> dict[str, Any] | None:
    for key in raw:
        if str(key) not in _SCHEME_MARKERS:
            report.drop(f"{path}.{_clean(str(key))}", "unknown key")
    required_key = _pick(raw, "required_devices", "required_gpus", path, report)
    memory_key = _pick(raw, "memory_mb", "gpu_mem_mb", path, report)
    devices = _required(raw.get(required_key), f"{path}.{required_key}", report)
    if devices is None:
        report.drop(path, "the scheme names a device this project cannot match")
        return None
    if not _memory(raw, memory_key, devices, path, report):
        report.drop(path, "the scheme names a device this project cannot match")
        return None

    script = _launcher(raw, path, report, platform)
    if script is None:
        return None
    return {"devices": _Flow(devices), "script": script}


def _pick(raw: dict[str, Any], newer: str, older: str, path: str, report: _Report) -> str:
    """The key to read: the newer name, or the older one (of earlier versions) alone."""
    if older not in raw:
        return newer
    if newer in raw:
        report.drop(f"{path}.{older}", f"{newer} is used instead")
        return newer
    return older


def _required(value: object, path: str, report: _Report) -> dict[str, int] | None:
    """``required_devices`` as device key -> 0 MiB; None when a name cannot be a key."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        report.drop(path, "not a list of device names; the scheme needs no device")
        return {}
    devices: dict[str, int] = {}
    for i, item in enumerate(value):
        if not isinstance(item, str):
            report.drop(f"{path}.{i}", f"{item!r} is not a device name")
            continue
        problem = _device_key_problem(item)
        if problem:
            report.drop(f"{path}.{i}", f"{item!r}: {problem}")
            return None
        if any(k.casefold() == item.casefold() for k in devices):
            continue  # the same device twice
        devices[item] = 0
    return devices


def _memory(
    raw: dict[str, Any], key: str, devices: dict[str, int], path: str, report: _Report
) -> bool:
    """Fill in ``devices`` from ``memory_mb``; False when it names an impossible device."""
    mpath = f"{path}.{key}"
    value = raw.get(key)
    if value is None:
        if devices:
            report.note(mpath, "no memory figures: each device must only be present (0 MiB)")
        return True
    if not isinstance(value, dict):
        mib, rounded = _mib(value)
        if mib is None:
            report.drop(mpath, f"{value!r} is not a number of MiB")
        elif not devices:
            report.drop(mpath, "a single figure, and no device in required_devices to apply it to")
        else:
            first = next(iter(devices))
            devices[first] = mib
            rest = ", ".join(repr(d) for d in list(devices)[1:])
            also = f"; {rest} must only be present (0 MiB)" if rest else ""
            report.note(mpath, f"a single figure: {mib} MiB applied to device {first!r}{also}")
            if rounded:
                report.note(mpath, f"{value} MiB rounded up to {mib}")
        return True
    for device, figure in value.items():
        device = str(device)
        dpath = f"{mpath}.{_clean(device)}"
        target = next((k for k in devices if k.casefold() == device.casefold()), None)
        if target is None:
            problem = _device_key_problem(device)
            if problem:
                report.drop(dpath, f"{device!r}: {problem}")
                return False
            target = device
            devices[target] = 0
            report.note(
                dpath,
                "the device is not in required_devices; the scheme requires it here too",
            )
        mib, rounded = _mib(figure)
        if mib is None:
            report.drop(
                dpath, f"{figure!r} is not a number of MiB; the device must only be present"
            )
            continue
        devices[target] = mib
        if rounded:
            report.note(dpath, f"{figure} MiB rounded up to {mib}")
    for device, mib in devices.items():
        if mib == 0 and not any(str(d).casefold() == device.casefold() for d in value):
            report.note(mpath, f"no figure for {device!r}: it must only be present (0 MiB)")
    return True


def _launcher(raw: dict[str, Any], path: str, report: _Report, platform: str) -> str | None:
    """``script_path`` (newer) or ``bat_path`` as the scheme's ``script``."""
    chosen: str | None = None
    for key in ("script_path", "bat_path"):
        if key not in raw:
            continue
        value = raw[key]
        kpath = f"{path}.{key}"
        if not isinstance(value, str) or not value.strip():
            report.drop(kpath, f"{value!r} is not a script path")
        elif chosen is None:
            chosen = value
        elif value != chosen:
            report.drop(kpath, "script_path is used instead")
    if chosen is None:
        report.drop(path, "no bat_path or script_path: nothing to start the model with")
        return None
    if platform != "win32" and chosen.strip().lower().endswith(_BATCH_SUFFIXES):
        backslash = (
            "; its path uses '\\', which is not a folder separator here" if "\\" in chosen else ""
        )
        report.note(
            f"{path}.script",
            "a Windows batch file: LLM-Manager runs on Linux, where it would be run with "
            "/bin/sh and fail; replace it with a .sh script that ends in "
            f"`exec SERVER ...`, or with a `command:`{backslash}",
        )
    return chosen


def _resolve_names(models: list[_Model], server: dict[str, Any], report: _Report) -> dict[str, Any]:
    """Names, aliases and ports made unique as this project requires (ignoring case)."""
    owners: dict[str, str] = {}
    kept: list[_Model] = []
    for model in models:
        folded = model.name.casefold()
        if not model.name.strip():
            report.drop(model.path, "a model name cannot be empty")
        elif folded == RESERVED_NAME:
            report.drop(model.path, f"the name {RESERVED_NAME!r} is reserved by the API")
        elif folded in owners:
            report.drop(
                model.path,
                f"the name is already used by model {owners[folded]!r} (names ignore case)",
            )
        else:
            owners[folded] = model.name
            kept.append(model)
    ports: dict[int, str] = {}
    server_port = server.get("port", 8080)
    if server_port:
        ports[server_port] = "the server itself (server.port)"
    out: dict[str, Any] = {}
    for model in kept:
        aliases: list[str] = []
        for i, alias in enumerate(model.aliases):
            folded = alias.casefold()
            apath = f"{model.path}.aliases.{i}"
            if not alias.strip():
                report.drop(apath, "an empty alias")
            elif folded == model.name.casefold():
                report.note(apath, f"{alias!r} is the model's name already; not repeated")
            elif folded == RESERVED_NAME:
                report.drop(apath, f"{alias!r} is reserved by the API")
            elif folded in owners:
                owner = owners[folded]
                if owner == model.name:
                    continue  # the same alias twice in one model
                report.drop(apath, f"{alias!r} is already used by model {owner!r}")
            else:
                owners[folded] = model.name
                aliases.append(alias)
        entry: dict[str, Any] = {}
        if aliases:
            entry["aliases"] = _FlowList(aliases)
        entry["mode"] = model.body["mode"]
        if model.port is not None:
            if model.port in ports:
                report.drop(
                    model.port_path,
                    f"port {model.port} is already used by {ports[model.port]}; "
                    "a free port is picked at each start instead",
                )
            else:
                ports[model.port] = f"model {model.name!r}"
                entry["port"] = model.port
        for key in ("auto_start", "idle_timeout"):
            if key in model.body:
                entry[key] = model.body[key]
        entry["schemes"] = model.body["schemes"]
        out[model.name] = entry
    return out


# --- YAML --------------------------------------------------------------------------------


class _Flow(dict[str, int]):
    """A mapping written in flow style: ``{rtx 4060: 6144, v100: 16000}``."""


class _FlowList(list[str]):
    """A list written in flow style: ``[a, b]``."""


class _Dumper(yaml.SafeDumper):
    pass


def _flow_mapping(dumper: yaml.SafeDumper, data: _Flow) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=True)


def _flow_sequence(dumper: yaml.SafeDumper, data: _FlowList) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(_Flow, _flow_mapping)
_Dumper.add_representer(_FlowList, _flow_sequence)


def _dump(document: dict[str, Any]) -> str:
    text: str = yaml.dump(
        document,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=4096,
    )
    return text


def _header(source: str, items: list[ReportItem]) -> str:
    lines = [
        f"# Imported from {_clean(source)}, a configuration of the original LLM-Manager,",
        "# by `llm-manager import-config`. Check it with `llm-manager check-config FILE`;",
        "# docs/configuration.md describes every key.",
        "#",
        "# Device names from required_devices and memory_mb are scheme device keys here: a",
        "# name matches a detected GPU whose name contains it, ignoring case, spaces and",
        '# dashes ("rtx 4060" matches "NVIDIA GeForce RTX 4060"); "cpu" is system RAM. A',
        "# device that cannot be probed can be declared under `devices:`.",
        "# Relative script paths are resolved against this file's directory.",
    ]
    if items:
        lines += ["#", "# What the import did not carry over, or changed:"]
        lines += [f"#   {_clean(str(item))}" for item in items]
    else:
        lines += ["#", "# Everything was carried over."]
    return "\n".join(lines) + "\n\n"
