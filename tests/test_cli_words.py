"""Human output in plain words (issue 16, point 4), the CLI as a subprocess against a real
manager: "ready" for the API's "routing", "scheme" and "command" for "config_source" and
"current_bat_path", the configuration's "chat" for the API's "Chat", no idle time for a
stopped model, and model names never cut at 80 columns. --json keeps the API's words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fake_command
from tests.test_server_process import Manager, launch, stop_cleanly, write_config

CLI = [sys.executable, "-m", "llm_manager"]
# Alike up to their last characters: cut to "gemma-3-270m…" they cannot be told apart.
RUNNING = "gemma-3-270m-it-qat-q4_0-gguf-a"
STOPPED = "gemma-3-270m-it-qat-q4_0-gguf-b"


@pytest.fixture
def manager(tmp_path: Path, spawn_log: Path) -> Iterator[Manager]:
    command = fake_command("--spawn-log", str(spawn_log))
    models = {
        RUNNING: {"aliases": ["ga"], "schemes": {"cpu": {"command": command}}},
        STOPPED: {"schemes": {"cpu": {"command": command}}},
    }
    m = launch(write_config(tmp_path, models), tmp_path)
    try:
        assert m.post(f"/api/models/{RUNNING}/start")["success"]
        yield m
    finally:
        stop_cleanly(m)


def cli(m: Manager, *args: str, columns: int = 80) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MANAGER_")}
    env["COLUMNS"] = str(columns)
    result = subprocess.run(
        [*CLI, *args, "--url", m.url], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(table: str) -> dict[str, list[str]]:
    """The body rows of a rich table: first cell -> cells (one line per row here)."""
    found = {}
    for line in table.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            found[cells[0]] = cells
    return found


def test_models_table_in_words_with_whole_names_at_80_columns(manager: Manager) -> None:
    out = cli(manager, "models", columns=80)
    assert "…" not in out
    assert all(len(line) <= 80 for line in out.splitlines())
    table = rows(out)
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    columns = [c.strip() for c in header.strip("┃").split("┃")]
    running, stopped = table[RUNNING], table[STOPPED]  # both names whole, on one line
    assert running[columns.index("state")] == "ready"
    assert running[columns.index("mode")] == "chat"
    assert running[columns.index("idle")].endswith("s")
    assert stopped[columns.index("state")] == "stopped"
    assert stopped[columns.index("idle")] == "-"  # no idle time for a stopped model
    assert "routing" not in out and "Chat" not in out
    # pid, port and pending were left out to keep the names whole; a wide terminal has them.
    assert "pid" not in columns
    wide = cli(manager, "models", columns=160)
    header = next(line for line in wide.splitlines() if line.startswith("┃"))
    assert {"pid", "port", "pending"} <= {c.strip() for c in header.strip("┃").split("┃")}


def test_a_narrow_terminal_folds_names_but_never_cuts_them(manager: Manager) -> None:
    out = cli(manager, "models", columns=50)
    assert "…" not in out
    assert all(len(line) <= 50 for line in out.splitlines())
    first_column = "".join(
        line.strip("│").split("│")[0].strip() for line in out.splitlines() if line.startswith("│")
    )
    assert RUNNING in first_column and STOPPED in first_column


def test_info_in_words_and_json_unchanged(manager: Manager) -> None:
    out = cli(manager, "info", "ga", columns=120)
    fields = {cells[0]: cells[1] for cells in rows(out).values() if len(cells) > 1}
    assert fields["name"] == RUNNING
    assert fields["state"] == "ready"
    assert fields["mode"] == "chat"
    assert fields["scheme"] == "cpu"
    assert fields["command"] not in ("", "-")
    assert "config_source" not in out and "current_bat_path" not in out
    stopped = {c[0]: c[1] for c in rows(cli(manager, "info", STOPPED, columns=120)).values()}
    assert stopped["idle"] == "-" and stopped["state"] == "stopped"
    data = json.loads(cli(manager, "info", "ga", "--json"))["model"]
    assert data["status"] == "routing" and data["mode"] == "Chat"
    assert data["config_source"] == "cpu" and data["current_bat_path"]
    listing = json.loads(cli(manager, "models", "--json"))["models"]
    assert listing[STOPPED]["status"] == "stopped" and "idle_time_sec" in listing[STOPPED]
