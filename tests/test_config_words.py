"""check-config in words a person can act on (issue 16, points 2 and 7): memory sizes with
units, "did you mean" for a mistyped key, and warnings for commands it cannot find; the
CLI as a subprocess where it is about the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_manager.config import ConfigError, json_schema, parse_mib, parse_text

CLI = [sys.executable, "-m", "llm_manager"]


def scheme_yaml(devices: str) -> str:
    return textwrap.dedent(
        f"""\
        models:
          m:
            schemes:
              cpu:
                devices: {{cpu: {devices}}}
                command: run
        """
    )


@pytest.mark.parametrize(
    ("written", "mib"),
    [
        ("800", 800),
        ("800MiB", 800),
        ("800mib", 800),
        ("800 MiB", 800),
        ("800Mi", 800),
        ("800M", 800),
        ("8GiB", 8192),
        ("8G", 8192),
        ("1.5G", 1536),
        ("1.5GiB", 1536),
        ("800MB", 763),  # 800,000,000 bytes, rounded up
        ("8GB", 7630),
        ("1TiB", 1024 * 1024),
        ("2048KiB", 2),
        ("1K", 1),  # rounded up: a need is never understated
        ("0GiB", 0),
        ("'1048576B'", 1),
        ("2048.0", 2048),
    ],
)
def test_memory_sizes(written: str, mib: int) -> None:
    config = parse_text(scheme_yaml(written), "t")
    assert config.models["m"].schemes["cpu"].devices == {"cpu": mib}


@pytest.mark.parametrize("written", ["800 megs", "8XB", "1.5", "'-5GiB'", "true", "G", "'1,5G'"])
def test_a_size_that_is_not_one_says_how_to_write_one(written: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(scheme_yaml(written), "t")
    [problem] = info.value.problems
    assert (problem.path, problem.line) == ("models.m.schemes.cpu.devices.cpu", 5)
    assert "integer" not in problem.message  # not pydantic's "unable to parse ... integer"
    assert "800MiB, 8GiB, 1.5G" in problem.message and "MiB" in problem.message


def test_negative_sizes_and_schema() -> None:
    with pytest.raises(ConfigError):
        parse_text(scheme_yaml("-1"), "t")
    assert parse_mib(7) == 7  # whole numbers pass on to the field's own checks
    schema = json.loads(json_schema())
    sizes = schema["$defs"]["SchemeConfig"]["properties"]["devices"]["additionalProperties"]
    # A size, or auto (written, or nothing after the key).
    assert {"integer", "string", "null"} == {choice["type"] for choice in sizes["anyOf"]}
    pattern = next(c["pattern"] for c in sizes["anyOf"] if c["type"] == "string")
    assert re.match(pattern, "auto") and re.match(pattern, "8GiB") and not re.match(pattern, "x")


@pytest.mark.parametrize(
    ("yaml_text", "path", "meant"),
    [
        ("server:\n  prot: 1\n", "server.prot", "port"),
        ("model: {}\n", "model", "models"),
        (
            "models:\n  m:\n    aliasses: [x]\n    schemes: {s: {command: run}}\n",
            "models.m.aliasses",
            "aliases",
        ),
        (
            "models:\n  m:\n    schemes:\n      s: {comand: run, command: run}\n",
            "models.m.schemes.s.comand",
            "command",
        ),
        (
            "models:\n  m:\n    schemes:\n      s: {command: run, enviroment: {}}\n",
            "models.m.schemes.s.enviroment",
            "env",
        ),
        (
            "devices:\n  - {name: a, memory_total: 1, memory_total_mib: 1}\n",
            "devices.0.memory_total",
            "memory_total_mib",
        ),
    ],
)
def test_did_you_mean(yaml_text: str, path: str, meant: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(yaml_text, "t")
    messages = {p.path: p.message for p in info.value.problems}
    assert messages[path] == (
        f"unknown key (not part of the configuration); did you mean {meant!r}?"
    )


def test_no_guess_for_a_key_like_nothing() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text("server:\n  zzzzzz: 1\n", "t")
    assert info.value.problems[0].message == "unknown key (not part of the configuration)"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MANAGER_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def test_check_config_on_sizes_and_typos(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(scheme_yaml("800MB").replace("command: run", f"command: {sys.executable}"))
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "valid (1 model(s): m)" in result.stdout and result.stderr == ""
    bad = tmp_path / "bad.yaml"
    bad.write_text(scheme_yaml("800 megs").replace("command: run", "comand: run"))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert "'800 megs' is not a memory size: write MiB" in result.stderr
    assert "models.m.schemes.cpu.comand (line 6): unknown key" in result.stderr
    assert "did you mean 'command'?" in result.stderr


def test_check_config_warns_about_commands_it_cannot_find(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        textwrap.dedent(
            """\
            models:
              here:
                schemes:
                  cpu:
                    command: python3 -V
              missing:
                schemes:
                  cpu:
                    command: no-such-engine-anywhere --port {port}
              by-path:
                schemes:
                  cpu:
                    command: ./bin/engine
              script:
                schemes:
                  cpu:
                    script: start.sh
              bundled:
                schemes:
                  cpu:
                    command: llm-manager llama-server -m x.gguf --port {port}
            """
        )
    )
    result = run_cli("check-config", str(config))
    assert result.returncode == 0  # valid: the file may be meant for another machine
    assert "valid (5 model(s)" in result.stdout
    err = result.stderr.splitlines()
    assert any(
        "models.missing.schemes.cpu.command (line 9): warning: command 'no-such-engine-anywhere' "
        "not found on PATH (nor in " in line
        for line in err
    ), err
    assert any(f"command '{tmp_path}/bin/engine' does not exist" in line for line in err), err
    assert any(f"script {tmp_path}/start.sh does not exist" in line for line in err), err
    assert not any("models.here" in line or "models.bundled" in line for line in err), err
    assert err[-1].startswith("3 warning(s)")
