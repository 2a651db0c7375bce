"""`llm-manager import-config`: the original LLM-Manager's config.json -> this YAML."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_manager.config import Config, parse_text
from llm_manager.importer import ImportFailed, ReportItem, convert, parse_json

# The shape of the original project's config.json: a "program" section, then one key per
# model whose device-named keys are schemes. Written here with the kinds of entries a real
# file has: multi-GPU and CPU schemes, bat_path and script_path, memory_mb as a mapping and
# as one number, and keys this project has no use for.
ORIGINAL: dict[str, Any] = {
    "program": {
        "host": "127.0.0.1",
        "port": 8080,
        "alive_time": 60,
        "Disable_GPU_monitoring": False,
        "device_plugin_dir": "plugins/devices",
        "interface_plugin_dir": "plugins/interfaces",
        "log_level": "DEBUG",
        "TokenTracker": ["Chat", "Base", "Embedding", "Reranker"],
        "tray_icon": True,
    },
    "Qwen3-Coder-30B-A3B-Instruct-UD-64K": {
        "aliases": ["Qwen3-Coder-30B-A3B-Instruct-64K", "Qwen3-Coder-30B-A3B-Instruct"],
        "mode": "Chat",
        "port": 10001,
        "auto_start": False,
        "RTX4060-V100": {
            "required_devices": ["rtx 4060", "v100"],
            "bat_path": "Model_startup_script\\Qwen3-Coder-30B-A3B-Instruct-UD-64K.bat",
            "memory_mb": {"rtx 4060": 6144, "v100": 16000},
        },
        "RTX4060": {
            "required_devices": ["rtx 4060"],
            "bat_path": "Model_startup_script\\RTX4060\\Qwen3-Coder-64K-RTX4060.bat",
            "memory_mb": {"rtx 4060": 5120},
        },
        "CPU": {
            "required_devices": ["cpu"],
            "script_path": "scripts/qwen3-coder-cpu.sh",
            "memory_mb": 24000,
            "priority": 3,
        },
    },
    "Qwen3-Embedding-8B": {
        "aliases": ["Qwen3-Embedding-8B", "qwen-embed"],
        "mode": "Embedding",
        "port": 10012,
        "auto_start": True,
        "alive_time": 5,
        "RTX4060": {
            "required_devices": ["rtx 4060"],
            "script_path": "scripts/qwen-embedding.sh",
            "memory_mb": {"rtx 4060": 6500},
        },
    },
    "bge-reranker-v2-m3": {
        "aliases": ["bge-reranker"],
        "mode": "Reranker",
        "port": 10014,
        "notes": "fast",
        "V100": {
            "required_devices": ["v100", "cpu"],
            "bat_path": "Model_startup_script\\bge-reranker-v2-m3.bat",
            "memory_mb": {"v100": 768},
        },
    },
    "wake_on_lan": {"mac": "00:11:22:33:44:55"},
}


def lines(report: list[ReportItem]) -> list[str]:
    return [str(item) for item in report]


def test_realistic_config_converts_and_validates() -> None:
    text, report = convert(ORIGINAL, "config.json", platform="linux")
    config = parse_text(text, "converted")
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8080
    assert config.server.idle_timeout == 3600.0
    assert list(config.models) == [
        "Qwen3-Coder-30B-A3B-Instruct-UD-64K",
        "Qwen3-Embedding-8B",
        "bge-reranker-v2-m3",
    ]
    coder = config.models["Qwen3-Coder-30B-A3B-Instruct-UD-64K"]
    assert coder.aliases == ["Qwen3-Coder-30B-A3B-Instruct-64K", "Qwen3-Coder-30B-A3B-Instruct"]
    assert coder.mode == "chat"
    assert coder.port == 10001
    assert coder.auto_start is False
    assert coder.idle_timeout is None
    # Schemes keep their names and their order (the order they are tried in).
    assert list(coder.schemes) == ["RTX4060-V100", "RTX4060", "CPU"]
    two = coder.schemes["RTX4060-V100"]
    assert two.devices == {"rtx 4060": 6144, "v100": 16000}
    assert two.script == "Model_startup_script\\Qwen3-Coder-30B-A3B-Instruct-UD-64K.bat"
    assert two.command is None
    assert coder.schemes["RTX4060"].devices == {"rtx 4060": 5120}
    cpu = coder.schemes["CPU"]
    assert cpu.devices == {"cpu": 24000}
    assert cpu.script == "scripts/qwen3-coder-cpu.sh"

    embed = config.models["Qwen3-Embedding-8B"]
    assert embed.mode == "embedding"
    assert embed.aliases == ["qwen-embed"]  # its own name is not repeated as an alias
    assert embed.auto_start is True
    assert embed.idle_timeout == 300.0
    assert embed.schemes["RTX4060"].devices == {"rtx 4060": 6500}

    rerank = config.models["bge-reranker-v2-m3"]
    assert rerank.mode == "reranker"
    # A required device without a memory figure must only be present.
    assert rerank.schemes["V100"].devices == {"v100": 768, "cpu": 0}

    # Where it came from, at the top of the file.
    assert text.startswith("# Imported from config.json")
    assert "llm-manager check-config" in text.split("\n\n")[0]
    assert report, "the realistic file has things that are not carried over"


def test_report_names_everything_dropped() -> None:
    _, report = convert(ORIGINAL, "config.json", platform="linux")
    text = lines(report)
    for expected in (
        "not carried over: program.Disable_GPU_monitoring (",
        "not carried over: program.device_plugin_dir (",
        "not carried over: program.interface_plugin_dir (",
        "not carried over: program.log_level (",
        "not carried over: program.TokenTracker (",
        "not carried over: program.tray_icon (unknown key)",
        "not carried over: models.Qwen3-Coder-30B-A3B-Instruct-UD-64K.CPU.priority (unknown key)",
        "not carried over: models.bge-reranker-v2-m3.notes (unknown key)",
        "not carried over: wake_on_lan (",
    ):
        assert any(line.startswith(expected) for line in text), (expected, text)
    # Changes worth knowing are notes, not losses.
    assert any(
        line.startswith("note: models.Qwen3-Coder-30B-A3B-Instruct-UD-64K.CPU.memory_mb: ")
        and "24000 MiB applied to device 'cpu'" in line
        for line in text
    )
    assert any("'cpu'" in line and "must only be present" in line for line in text)
    # The report is also in the file's opening comments.
    yaml_text, _ = convert(ORIGINAL, "config.json", platform="linux")
    header = yaml_text.split("\n\n")[0]
    for line in text:
        assert f"#   {line}" in header


def test_every_unknown_key_is_reported_never_silently_dropped() -> None:
    data = json.loads(json.dumps(ORIGINAL))
    data["program"]["zzz_program"] = 1
    data["bge-reranker-v2-m3"]["zzz_model"] = [1]
    data["bge-reranker-v2-m3"]["V100"]["zzz_scheme"] = "x"
    data["zzz_top"] = 3
    _, report = convert(data, platform="linux")
    paths = {item.path for item in report if item.dropped}
    assert {
        "program.zzz_program",
        "models.bge-reranker-v2-m3.zzz_model",
        "models.bge-reranker-v2-m3.V100.zzz_scheme",
        "models.zzz_top",
    } <= paths


def test_bat_scripts_get_a_note_on_linux_but_not_on_windows() -> None:
    _, linux = convert(ORIGINAL, platform="linux")
    bat_notes = [i for i in linux if not i.dropped and "Windows batch file" in i.reason]
    assert {i.path for i in bat_notes} == {
        "models.Qwen3-Coder-30B-A3B-Instruct-UD-64K.RTX4060-V100.script",
        "models.Qwen3-Coder-30B-A3B-Instruct-UD-64K.RTX4060.script",
        "models.bge-reranker-v2-m3.V100.script",
    }
    assert all("'\\'" in i.reason for i in bat_notes)  # the backslashes are pointed out
    _, windows = convert(ORIGINAL, platform="win32")
    assert not [i for i in windows if "Windows batch file" in i.reason]


def test_unknown_mode_defaults_to_chat_and_is_reported() -> None:
    data = {"m": {"mode": "Vision", "CPU": {"required_devices": ["cpu"], "bat_path": "m.sh"}}}
    text, report = convert(data)
    assert parse_text(text, "t").models["m"].mode == "chat"
    assert "not carried over: models.m.mode (unknown mode 'Vision'; " in lines(report)[0]


def test_memory_mb_as_one_number_goes_to_the_first_device() -> None:
    data = {
        "m": {
            "GPUs": {
                "required_devices": ["rtx 4060", "v100"],
                "script_path": "m.sh",
                "memory_mb": 4000,
            }
        }
    }
    text, report = convert(data)
    assert parse_text(text, "t").models["m"].schemes["GPUs"].devices == {
        "rtx 4060": 4000,
        "v100": 0,
    }
    assert any(
        "4000 MiB applied to device 'rtx 4060'" in s and "'v100' must only be present" in s
        for s in lines(report)
    )


def test_memory_for_a_device_not_in_required_devices_is_required_too() -> None:
    data = {
        "m": {
            "s": {
                "required_devices": ["v100"],
                "script_path": "m.sh",
                "memory_mb": {"V100": 1000, "cpu": 2048.5},
            }
        }
    }
    text, report = convert(data)
    # Matched ignoring case; a fraction of a MiB is rounded up.
    assert parse_text(text, "t").models["m"].schemes["s"].devices == {"v100": 1000, "cpu": 2049}
    assert any(
        "models.m.s.memory_mb.cpu: the device is not in required_devices" in s
        for s in lines(report)
    )
    assert any("2048.5 MiB rounded up to 2049" in s for s in lines(report))


def test_older_key_names_are_read() -> None:
    data = {
        "program": {"openai_host": "127.0.0.1", "openai_port": 9000, "alive_time": 1.5},
        "m": {
            "aliases": ["mm"],
            "RTX4060": {
                "required_gpus": ["rtx 4060"],
                "bat_path": "m.sh",
                "gpu_mem_mb": {"rtx 4060": 3000},
            },
        },
    }
    text, report = convert(data)
    config = parse_text(text, "t")
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)
    assert config.server.idle_timeout == 90.0  # 1.5 minutes
    assert config.models["m"].schemes["RTX4060"].devices == {"rtx 4060": 3000}
    assert not [i for i in report if i.dropped]


def test_names_aliases_and_ports_are_made_unique() -> None:
    scheme = {"required_devices": ["cpu"], "script_path": "x.sh"}
    data = {
        "program": {"port": 8080},
        "a": {"aliases": ["shared", "a"], "port": 10001, "cpu": scheme},
        "b": {"aliases": ["SHARED", "b2", "all-models"], "port": 10001, "cpu": scheme},
        "A": {"cpu": scheme},
        "c": {"port": 8080, "cpu": scheme},
        "all-models": {"cpu": scheme},
    }
    text, report = convert(data)
    config = parse_text(text, "t")
    assert list(config.models) == ["a", "b", "c"]
    assert config.models["a"].aliases == ["shared"]
    assert config.models["b"].aliases == ["b2"]
    assert config.models["b"].port is None
    assert config.models["c"].port is None
    dropped = {i.path: i.reason for i in report if i.dropped}
    assert "already used by model 'a'" in dropped["models.b.aliases.0"]
    assert "reserved" in dropped["models.b.aliases.2"]
    assert "port 10001 is already used by model 'a'" in dropped["models.b.port"]
    assert "server itself" in dropped["models.c.port"]
    assert "already used by model 'a'" in dropped["models.A"]
    assert "reserved" in dropped["models.all-models"]


def test_schemes_that_cannot_be_used_are_dropped_and_reported() -> None:
    data = {
        "no-launcher": {"cpu": {"required_devices": ["cpu"], "memory_mb": {"cpu": 1}}},
        "bad-device": {
            "gpu": {"required_devices": ["gpu:0"], "bat_path": "x.sh"},
            "cpu": {"required_devices": ["cpu"], "bat_path": "x.sh"},
        },
        "not-a-model": 42,
    }
    text, report = convert(data)
    config = parse_text(text, "t")
    assert list(config.models) == ["bad-device"]
    assert list(config.models["bad-device"].schemes) == ["cpu"]
    dropped = {i.path: i.reason for i in report if i.dropped}
    assert "nothing to start" in dropped["models.no-launcher.cpu"]
    assert "no usable scheme" in dropped["models.no-launcher"]
    assert "cuda:N or amd:N" in dropped["models.bad-device.gpu.required_devices.0"]
    assert "models.bad-device.gpu" in dropped
    assert "not a model" in dropped["models.not-a-model"]


def test_bad_values_are_reported() -> None:
    data = {
        "program": {"host": 5, "port": "8080", "alive_time": "an hour"},
        "m": {
            "port": 70000,
            "auto_start": "yes",
            "alive_time": -1,
            "aliases": ["ok", 7],
            "s": {"required_devices": ["cpu"], "script_path": "x.sh", "memory_mb": {"cpu": "lots"}},
        },
    }
    text, report = convert(data)
    config = parse_text(text, "t")
    assert config.server == Config().server
    model = config.models["m"]
    assert (model.port, model.auto_start, model.idle_timeout) == (None, False, None)
    assert model.aliases == ["ok"]
    assert model.schemes["s"].devices == {"cpu": 0}
    assert {i.path for i in report if i.dropped} >= {
        "program.host",
        "program.port",
        "program.alive_time",
        "models.m.port",
        "models.m.auto_start",
        "models.m.alive_time",
        "models.m.aliases.1",
        "models.m.s.memory_mb.cpu",
    }


def test_an_empty_object_gives_an_empty_valid_configuration() -> None:
    text, report = convert({})
    assert parse_text(text, "t").models == {}
    assert report == []


def test_parse_json_errors_and_duplicates() -> None:
    with pytest.raises(ImportFailed, match=r"not valid JSON: .* line 1 column"):
        parse_json('{"program": ')
    with pytest.raises(ImportFailed, match="not an object"):
        parse_json("[1, 2]")
    data, duplicates = parse_json('{"m": {"port": 1, "port": 2}}')
    assert data == {"m": {"port": 2}}
    assert [str(d) for d in duplicates] == [
        "not carried over: port (the key appears twice in one JSON object; "
        "only its last value was read)"
    ]


# Any JSON object the original could have held converts to a valid configuration.
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.integers(),
    st.sampled_from([10**400, 1e308, 2.9e306, -0.0, 0.5]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
_names = st.one_of(
    st.sampled_from(["cpu", "CPU", "rtx 4060", "v100", "cuda:0", "gpu:1", "", " ", "a:b"]),
    st.text(max_size=6),
)
_scheme = st.fixed_dictionaries(
    {},
    optional={
        "required_devices": st.one_of(st.lists(st.one_of(_names, _scalars), max_size=3), _scalars),
        "memory_mb": st.one_of(st.dictionaries(_names, _scalars, max_size=3), _scalars),
        "bat_path": st.one_of(st.sampled_from(["a.bat", "b\\c.bat", "x.sh", ""]), _scalars),
        "script_path": st.one_of(st.sampled_from(["a.sh", "{port}.sh"]), _scalars),
        "extra": _scalars,
    },
)
_model = st.fixed_dictionaries(
    {},
    optional={
        "aliases": st.one_of(st.lists(st.one_of(_names, _scalars), max_size=3), _scalars),
        "mode": st.one_of(st.sampled_from(["Chat", "Base", "Embedding", "Reranker"]), _scalars),
        "port": st.one_of(st.integers(0, 70000), _scalars),
        "auto_start": _scalars,
        "alive_time": _scalars,
        "S1": _scheme,
        "S2": _scheme,
        "other": _scalars,
    },
)
_program = st.fixed_dictionaries(
    {},
    optional={
        "host": _scalars,
        "port": st.one_of(st.integers(-1, 70000), _scalars),
        "openai_port": _scalars,
        "alive_time": _scalars,
        "log_level": _scalars,
    },
)
_original = st.dictionaries(
    st.one_of(st.sampled_from(["m1", "M1", "all-models", "cpu", "Qwen"]), st.text(max_size=5)),
    _model,
    max_size=4,
).flatmap(
    lambda models: st.one_of(st.just(models), _program.map(lambda p: {"program": p, **models}))
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_original)
def test_any_original_config_converts_to_a_valid_one(data: dict[str, Any]) -> None:
    text, report = convert(data, platform="linux")
    parse_text(text, "fuzz")  # raises ConfigError listing every problem
    assert all(isinstance(item, ReportItem) for item in report)


# --- the command -------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llm_manager", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_a_file_that_check_config_accepts(tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_text(json.dumps(ORIGINAL, indent=2, ensure_ascii=False), encoding="utf-8")
    done = run_cli("import-config", "config.json", "-o", "llm-manager.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "not carried over: program.log_level (" in done.stderr
    assert "not carried over: models.bge-reranker-v2-m3.notes (unknown key)" in done.stderr
    assert "wrote llm-manager.yaml: 3 model(s)" in done.stderr
    assert done.stdout == ""
    written = (tmp_path / "llm-manager.yaml").read_text(encoding="utf-8")
    assert written.startswith("# Imported from config.json")

    check = run_cli("check-config", "llm-manager.yaml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "llm-manager.yaml: valid (3 model(s): Qwen3-Coder-30B-A3B-Instruct-UD-64K," in (
        check.stdout
    )

    # An existing output is not overwritten without --force.
    again = run_cli("import-config", "config.json", "-o", "llm-manager.yaml", cwd=tmp_path)
    assert again.returncode == 1
    assert "already exists; use --force" in again.stderr
    forced = run_cli(
        "import-config", "config.json", "-o", "llm-manager.yaml", "--force", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr


def test_cli_prints_to_stdout_without_output(tmp_path: Path) -> None:
    # A byte-order mark, as Windows editors write one, is accepted.
    (tmp_path / "config.json").write_text(
        "\ufeff" + json.dumps({"m": {"cpu": {"required_devices": ["cpu"], "script_path": "m.sh"}}}),
        encoding="utf-8",
    )
    done = run_cli("import-config", "config.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert parse_text(done.stdout, "stdout").models["m"].schemes["cpu"].script == "m.sh"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"program": {"port": 8080,}}', "not valid JSON"),
        ("[]", "not an object"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_cli_bad_input_exits_1(tmp_path: Path, content: str | bytes, message: str) -> None:
    source = tmp_path / "config.json"
    if isinstance(content, bytes):
        source.write_bytes(content)
    else:
        source.write_text(content, encoding="utf-8")
    done = run_cli("import-config", "config.json", "-o", "out.yaml", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ")
    assert message in done.stderr
    assert not (tmp_path / "out.yaml").exists()


def test_cli_missing_file_exits_1(tmp_path: Path) -> None:
    done = run_cli("import-config", "nope.json", cwd=tmp_path)
    assert done.returncode == 1
    assert "error: cannot read nope.json" in done.stderr


def test_cli_output_folder_must_exist(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    done = run_cli("import-config", "config.json", "-o", "missing/out.yaml", cwd=tmp_path)
    assert done.returncode == 1
    assert "error: cannot write missing/out.yaml: folder" in done.stderr
    assert "not carried over" not in done.stderr  # refused before converting
