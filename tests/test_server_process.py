"""`llm-manager serve` as a real process: signals, exit status, orphans, CLI commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import alive, fake_command, read_pids

CLI = [sys.executable, "-m", "llm_manager"]


class Manager:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args, "--url", self.url],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "160"},
        )


def write_config(tmp_path: Path, models: dict[str, Any], **server: Any) -> Path:
    path = tmp_path / "llm-manager.yaml"
    data = {"server": {"data_dir": str(tmp_path / "data"), "stop_timeout": "2s", **server}}
    data["models"] = models
    path.write_text(yaml.safe_dump(data))
    return path


def launch(config: Path, tmp_path: Path, *options: str, timeout: float = 30) -> Manager:
    """`llm-manager serve` on a free port; returns once it says where it listens (within
    ``timeout`` seconds)."""
    log = tmp_path / "manager.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--config", str(config), "--port", "0", *options],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if found:
            return Manager(proc, log, found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("manager did not start:\n" + log.read_text())


def stop_cleanly(m: Manager) -> None:
    """SIGTERM (a clean stop takes its models with it); SIGKILL if it has not ended in 30 s."""
    if m.proc.poll() is not None:
        return
    m.proc.terminate()
    try:
        m.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        m.proc.kill()
        m.proc.wait()


@pytest.fixture
def manager_procs() -> Iterator[list[Manager]]:
    started: list[Manager] = []
    yield started
    for m in started:
        if m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_every_model_and_exits_zero(
    tmp_path: Path, spawn_log: Path, manager_procs: list[Manager], sig: signal.Signals
) -> None:
    models = {
        name: {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}}}
        for name in ("a", "b")
    }
    m = launch(write_config(tmp_path, models), tmp_path)
    manager_procs.append(m)
    assert m.post("/api/models/a/start")["success"] is True
    assert m.post("/api/models/b/start")["success"] is True
    pids = read_pids(spawn_log)
    assert len(pids) == 2 and all(alive(p) for p in pids)
    m.proc.send_signal(sig)
    assert m.proc.wait(timeout=30) == 0, m.log.read_text()
    assert not any(alive(p) for p in pids)
    assert "shutting down" in m.log.read_text()


def test_sigkill_of_manager_leaves_no_model_process(
    tmp_path: Path, spawn_log: Path, manager_procs: list[Manager]
) -> None:
    models = {
        "direct": {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}}},
        "forking": {
            "schemes": {
                "CPU": {"command": fake_command("--fork-grandchild", "--spawn-log", str(spawn_log))}
            }
        },
    }
    m = launch(write_config(tmp_path, models), tmp_path)
    manager_procs.append(m)
    m.post("/api/models/direct/start")
    m.post("/api/models/forking/start")
    grandchild_log = spawn_log.with_name(spawn_log.name + ".grandchild")
    wait_for(lambda: bool(read_pids(grandchild_log)))
    pids = read_pids(spawn_log) + read_pids(grandchild_log)
    assert len(pids) == 3 and all(alive(p) for p in pids)
    m.proc.kill()
    m.proc.wait()
    # The parent-death signal takes the direct children; the reaper the grandchild.
    wait_for(lambda: not any(alive(p) for p in pids), timeout=10)


def test_processes_left_by_an_earlier_run_are_killed_at_start(
    tmp_path: Path, manager_procs: list[Manager]
) -> None:
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run_dir = tmp_path / "data" / "run"
        run_dir.mkdir(parents=True)
        record = {
            "old": {
                "pid": orphan.pid,
                "pgid": orphan.pid,
                "create_time": psutil.Process(orphan.pid).create_time(),
            }
        }
        (run_dir / "processes.json").write_text(json.dumps(record))
        m = launch(write_config(tmp_path, {}), tmp_path)
        manager_procs.append(m)
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert "left by an earlier run" in m.log.read_text()
        # The record is rewritten just after the kill: wait for it, not for a lucky moment.
        wait_for(lambda: json.loads((run_dir / "processes.json").read_text()) == {})
        assert json.loads((run_dir / "processes.json").read_text()) == {}
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_recorded_pid_reused_by_another_process_is_spared(
    tmp_path: Path, manager_procs: list[Manager]
) -> None:
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run_dir = tmp_path / "data" / "run"
        run_dir.mkdir(parents=True)
        # Same PID, different start time: not the process the earlier run started.
        record = {"old": {"pid": bystander.pid, "pgid": bystander.pid, "create_time": 1.0}}
        (run_dir / "processes.json").write_text(json.dumps(record))
        m = launch(write_config(tmp_path, {}), tmp_path)
        manager_procs.append(m)
        m.get("/health")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_auto_start_does_not_delay_listening(
    tmp_path: Path, spawn_log: Path, manager_procs: list[Manager]
) -> None:
    slow = fake_command("--slow-start", "3", "--spawn-log", str(spawn_log))
    models = {"slow": {"auto_start": True, "schemes": {"CPU": {"command": slow}}}}
    began = time.monotonic()
    m = launch(write_config(tmp_path, models), tmp_path)
    manager_procs.append(m)
    info = m.get("/api/models/slow/info")["model"]
    assert time.monotonic() - began < 2.9
    assert info["status"] in ("starting", "health_check")
    wait_for(lambda: m.get("/api/models/slow/info")["model"]["status"] == "routing", timeout=20)
    m.proc.terminate()
    assert m.proc.wait(timeout=30) == 0


def test_client_commands(tmp_path: Path, spawn_log: Path, manager_procs: list[Manager]) -> None:
    models = {
        "tiny-chat": {
            "aliases": ["tiny"],
            "schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}},
        }
    }
    m = launch(write_config(tmp_path, models), tmp_path)
    manager_procs.append(m)
    result = m.cli("start", "tiny")
    assert result.returncode == 0 and "model 'tiny-chat' started" in result.stdout
    result = m.cli("models")
    assert result.returncode == 0
    assert "tiny-chat" in result.stdout and "ready" in result.stdout  # the API's "routing"
    result = m.cli("models", "--json")
    assert json.loads(result.stdout)["models"]["tiny-chat"]["status"] == "routing"
    result = m.cli("info", "tiny")
    assert result.returncode == 0 and "scheme" in result.stdout and "CPU" in result.stdout
    assert "config_source" not in result.stdout and "command" in result.stdout
    result = m.cli("info", "tiny", "--json")
    assert json.loads(result.stdout)["model"]["pid"] == read_pids(spawn_log)[0]
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(
        m.url + "/v1/chat/completions",
        data=json.dumps(chat).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["usage"]["prompt_tokens"] == 7
    deadline = time.monotonic() + 10
    while True:  # the record is committed by the writer thread within a moment
        result = m.cli("usage", "--json", "--requests", "5")
        data = json.loads(result.stdout)
        if data["total"]["requests"] == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert data["totals"]["tiny-chat"]["prompt_tokens"] == 7
    assert data["requests"][0]["endpoint"] == "/v1/chat/completions"
    result = m.cli("usage", "--requests", "5")
    assert result.returncode == 0 and "tiny-chat" in result.stdout and "recent" in result.stdout
    result = m.cli("stop", "tiny", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["success"] is True
    result = m.cli("info", "nope")
    assert result.returncode == 1 and "not found" in result.stderr
    m.proc.terminate()
    assert m.proc.wait(timeout=30) == 0


def test_client_command_without_server_says_so() -> None:
    result = subprocess.run(
        [*CLI, "models", "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "cannot reach LLM-Manager" in result.stderr


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: lots\nmodels:\n  m: {}\n")
    result = subprocess.run(
        [*CLI, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "server.port (line 2)" in result.stderr
    assert "models.m.schemes (line 4): required key is missing" in result.stderr


def test_check_config_and_schema(tmp_path: Path) -> None:
    good = write_config(tmp_path, {"m": {"schemes": {"CPU": {"command": "llama-server"}}}})
    result = subprocess.run([*CLI, "check-config", str(good)], capture_output=True, text=True)
    assert result.returncode == 0 and "valid" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n"
        "  a:\n"
        "    mode: talk\n"
        "    schemes:\n"
        "      gpu:\n"
        "        devices: {'cuda:x': 10}\n"
        "        command: x\n"
        "  b:\n"
        "    aliases: [A]\n"
        "    schemes: {cpu: {command: y}}\n"
    )
    result = subprocess.run([*CLI, "check-config", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1
    err = result.stderr
    assert "models.a.mode (line 3)" in err
    assert "models.a.schemes.gpu.devices.cuda:x (line 6)" in err
    assert "models.b.aliases.0 (line 9): name 'A' is already used by model 'a'" in err
    assert "3 problem(s) found" in err
    result = subprocess.run([*CLI, "config-schema"], capture_output=True, text=True)
    schema = json.loads(result.stdout)
    assert {"server", "devices", "models"} <= set(schema["properties"])


def test_env_config_lookup_and_builtin_fallback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LLM_MANAGER_CONFIG"}
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--data-dir", str(tmp_path / "d")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert "built-in quick-start configuration" in first
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0


def test_group_whose_leader_died_is_killed_and_unverifiable_records_are_spared(
    tmp_path: Path, manager_procs: list[Manager]
) -> None:
    # A leader that forked a worker and exited: the worker keeps the group alive.
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert leader.stdout is not None
    worker = int(leader.stdout.readline())
    leader.stdout.close()
    leader.wait()
    created = psutil.Process(worker).create_time()
    unverifiable = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run_dir = tmp_path / "data" / "run"
        run_dir.mkdir(parents=True)
        record = {
            "forked": {"pid": leader.pid, "pgid": leader.pid, "create_time": created},
            "unknown": {"pid": unverifiable.pid, "pgid": unverifiable.pid, "create_time": None},
        }
        (run_dir / "processes.json").write_text(json.dumps(record))
        m = launch(write_config(tmp_path, {}), tmp_path)
        manager_procs.append(m)
        wait_for(lambda: not alive(worker))
        assert unverifiable.poll() is None
    finally:
        unverifiable.kill()
        unverifiable.wait()
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
