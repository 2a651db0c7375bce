"""Per-scheme stop_command and hooks: order, failures, timeouts, and container-style
engines (a process that only its stop command can end) left behind by no stop, eviction
or crash."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_manager.config import HOOK_TIMEOUT, ConfigError, LoadedConfig, parse_text
from llm_manager.models.runstate import RunState
from llm_manager.models.runtime import State
from tests.conftest import (
    alive,
    fake_command,
    make_config,
    read_pids,
    running_manager,
    wait_until,
)

FAKES = Path(__file__).parent / "fakes"
HOOK = [sys.executable, str(FAKES / "hook_tool.py")]
ENGINE = [sys.executable, str(FAKES / "container_engine.py")]


def model(*switches: str, **scheme: Any) -> dict[str, Any]:
    return {
        "schemes": {"CPU": {"devices": {"cpu": 0}, "command": fake_command(*switches), **scheme}}
    }


def messages(mgr: Any, name: str = "m") -> list[str]:
    return [line.message for line in mgr.supervisor.resolve(name).log.lines()]


async def start_and_stop(mgr: Any, spawn_log: Path) -> tuple[int, float]:
    """Start model m, stop it; (its PID, gone now; seconds the stop took)."""
    assert (await mgr.post("/api/models/m/start"))[0] == 200
    pid = read_pids(spawn_log)[0]
    began = time.monotonic()
    status, body = await mgr.post("/api/models/m/stop")
    took = time.monotonic() - began
    assert status == 200 and body["success"] is True
    assert not alive(pid)
    return pid, took


def index(lines: list[str], prefix: str) -> int:
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            return i
    raise AssertionError(f"no line starting with {prefix!r} in {lines}")


# --- configuration ----------------------------------------------------------------------


def _scheme(**extra: Any) -> str:
    data = {"models": {"m": {"schemes": {"s": {"command": "true", **extra}}}}}
    return yaml.safe_dump(data)


def test_hook_forms_and_defaults() -> None:
    config = parse_text(
        _scheme(
            stop_command="docker stop llm-{name}",
            hooks={
                "before_start": ["docker", "rm", "-f", "llm-{name}"],
                "after_stop": {"command": "echo {pid}", "timeout": "5s"},
            },
        ),
        "test",
    )
    scheme = config.models["m"].schemes["s"]
    assert scheme.stop_command is not None
    assert scheme.stop_command.command == "docker stop llm-{name}"
    assert scheme.stop_command.timeout == HOOK_TIMEOUT == 30
    assert scheme.hooks.before_start is not None
    assert scheme.hooks.before_start.command == ["docker", "rm", "-f", "llm-{name}"]
    assert scheme.hooks.after_stop is not None and scheme.hooks.after_stop.timeout == 5
    assert scheme.hooks.after_start is None and scheme.hooks.before_stop is None


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"hooks": {"before_strat": "true"}}, "before_start"),  # did you mean
        ({"hooks": {"before_start": "echo {pid}"}}, "{pid} is unknown"),
        ({"hooks": {"after_stop": ""}}, "the command is empty"),
        ({"stop_command": []}, "the command is an empty list"),
        ({"stop_command": {"command": "true", "timeout": 0}}, "greater than 0"),
    ],
)
def test_bad_hooks_are_rejected(extra: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(_scheme(**extra), "test")
    assert fragment in str(info.value)


# --- stop_command -----------------------------------------------------------------------


async def test_stop_command_ends_a_signal_ignoring_process_before_any_signal(
    tmp_path: Path, spawn_log: Path
) -> None:
    order = tmp_path / "order.log"
    # SIGUSR1 (10) ends the fake server: its exit code shows who ended it (not SIGKILL).
    stop = [*HOOK, "signal", "{pid}", "10", str(order)]
    loaded = make_config(
        tmp_path,
        {"m": model("--ignore-sigterm", "--spawn-log", str(spawn_log), stop_command=stop)},
        stop_timeout="10s",
    )
    async with running_manager(loaded) as mgr:
        pid, took = await start_and_stop(mgr, spawn_log)
        assert took < 5  # not the 10 s SIGTERM grace
        assert order.read_text() == f"signal {pid} 10\n"
        lines = messages(mgr)
        assert (
            index(lines, "stopping: ")
            < index(lines, f"stop_command: {sys.executable}")
            < index(lines, f"[stop_command] sent signal 10 to {pid}")
            < index(lines, "stop_command done")
            < index(lines, "stopped (exit code -10)")
        )


async def test_failing_stop_command_is_logged_and_signals_follow(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(
        tmp_path,
        {"m": model("--spawn-log", str(spawn_log), stop_command=[*HOOK, "fail", "2"])},
    )
    async with running_manager(loaded) as mgr:
        pid, _ = await start_and_stop(mgr, spawn_log)
        lines = messages(mgr)
        assert (
            index(lines, "stop_command failed with exit code 2")
            < index(lines, "stopped (exit code -15)")  # SIGTERM did it
        )


# --- hooks ------------------------------------------------------------------------------


def _recording_hooks(path: Path) -> dict[str, Any]:
    def rec(stage: str, pid: bool = True) -> list[str]:
        return [*HOOK, "record", str(path), stage, "{name}", "{port}", *(["{pid}"] if pid else [])]

    return {
        "before_start": rec("before_start", pid=False),
        "after_start": rec("after_start"),
        "before_stop": rec("before_stop"),
        "after_stop": rec("after_stop"),
    }


def _failing(tmp_path: Path, spawn_log: Path, stage: str, code: int) -> tuple[Path, LoadedConfig]:
    """A model with recording hooks but one ``stage`` that fails with ``code``; returns
    the record file and the config."""
    record = tmp_path / "hooks.log"
    hooks = {**_recording_hooks(record), stage: [*HOOK, "fail", str(code)]}
    return record, make_config(tmp_path, {"m": model("--spawn-log", str(spawn_log), hooks=hooks)})


async def test_hooks_run_in_order_with_placeholders_and_output_in_the_log(
    tmp_path: Path, spawn_log: Path
) -> None:
    record = tmp_path / "hooks.log"
    loaded = make_config(
        tmp_path,
        {
            "m": model(
                "--spawn-log",
                str(spawn_log),
                hooks=_recording_hooks(record),
                stop_command=[*HOOK, "record", str(record), "stop_command", "{pid}"],
            )
        },
    )
    async with running_manager(loaded) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        runtime = mgr.supervisor.resolve("m")
        pid, port = read_pids(spawn_log)[0], runtime.port
        assert record.read_text().splitlines() == [
            f"before_start m {port}",
            f"after_start m {port} {pid}",
        ]
        lines = messages(mgr)
        assert (
            index(lines, "before_start: ")
            < index(lines, f"[before_start] recorded before_start m {port}")
            < index(lines, "starting with scheme CPU")
            < index(lines, "after_start done")
            < index(lines, "ready after")
        )
        assert (await mgr.post("/api/models/m/stop"))[0] == 200
        assert not alive(pid)
        assert record.read_text().splitlines()[2:] == [
            f"before_stop m {port} {pid}",
            f"stop_command {pid}",
            f"after_stop m {port} {pid}",
        ]
        lines = messages(mgr)
        assert index(lines, "after_stop done") > index(lines, "stopped (exit code")


async def test_failing_before_start_fails_the_start_and_runs_nothing(
    tmp_path: Path, spawn_log: Path
) -> None:
    record, loaded = _failing(tmp_path, spawn_log, "before_start", 3)
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503
        assert "was not started: before_start failed with exit code 3" in body["message"]
        assert read_pids(spawn_log) == []  # the engine never ran
        assert not record.exists()  # nor any other hook
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["status"] == "failed"
        assert "before_start failed with exit code 3" in info["model"]["failure_reason"]
        assert "[before_start] this hook fails on purpose" in messages(mgr)


async def test_failing_after_start_fails_the_start_and_stops_the_process(
    tmp_path: Path, spawn_log: Path
) -> None:
    record, loaded = _failing(tmp_path, spawn_log, "after_start", 4)
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "after_start failed with exit code 4" in body["message"]
        pid = read_pids(spawn_log)[0]
        assert not alive(pid)
        assert mgr.supervisor.resolve("m").state is State.FAILED
        # The process was stopped with the usual stop sequence, hooks included.
        stages = [line.split()[0] for line in record.read_text().splitlines()]
        assert stages == ["before_start", "before_stop", "after_stop"]


async def test_hook_past_its_timeout_is_killed_with_its_group(
    tmp_path: Path, spawn_log: Path
) -> None:
    hang = tmp_path / "hang.pid"
    hooks = {"before_start": {"command": [*HOOK, "hang", str(hang)], "timeout": "0.5s"}}
    loaded = make_config(tmp_path, {"m": model("--spawn-log", str(spawn_log), hooks=hooks)})
    async with running_manager(loaded) as mgr:
        began = time.monotonic()
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503
        assert "before_start ran past its timeout of 0.5 s" in body["message"]
        assert time.monotonic() - began < 5
        assert not alive(read_pids(hang)[0])
        assert read_pids(spawn_log) == []


async def test_failing_stop_hooks_are_logged_and_the_stop_completes(
    tmp_path: Path, spawn_log: Path
) -> None:
    hooks = {"before_stop": [*HOOK, "fail", "5"], "after_stop": [*HOOK, "fail", "6"]}
    loaded = make_config(tmp_path, {"m": model("--spawn-log", str(spawn_log), hooks=hooks)})
    async with running_manager(loaded) as mgr:
        pid, _ = await start_and_stop(mgr, spawn_log)
        runtime = mgr.supervisor.resolve("m")
        assert runtime.state is State.STOPPED and runtime.failure_reason is None
        lines = messages(mgr)
        assert (
            index(lines, "before_stop failed with exit code 5")
            < index(lines, "stopped (exit code")
            < index(lines, "after_stop failed with exit code 6")
        )
        # And the model starts again as usual.
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        await mgr.post("/api/models/m/stop")


async def test_a_stop_during_before_start_kills_the_hook(tmp_path: Path, spawn_log: Path) -> None:
    hang = tmp_path / "hang.pid"
    hooks = {"before_start": [*HOOK, "hang", str(hang)]}
    loaded = make_config(tmp_path, {"m": model("--spawn-log", str(spawn_log), hooks=hooks)})
    async with running_manager(loaded) as mgr:
        runtime = mgr.supervisor.resolve("m")
        starting = mgr.supervisor.resolve("m").ensure_ready()
        task = asyncio.ensure_future(starting)
        await wait_until(lambda: bool(read_pids(hang)))
        await runtime.stop("test")
        with pytest.raises(Exception, match="stopped while starting"):
            await task
        await wait_until(lambda: not alive(read_pids(hang)[0]))
        assert runtime.state is State.STOPPED
        assert read_pids(spawn_log) == []


# --- container-style engines ------------------------------------------------------------


def container_model(state: Path, spawn_log: Path, *, stop: bool = True, **extra: Any) -> Any:
    where = ["--state", str(state), "--name", "llm-{name}"]
    scheme: dict[str, Any] = {
        "devices": {"gpu": 6000},
        "command": [*ENGINE, "run", *where, "--port", "{port}", "--spawn-log", str(spawn_log)],
        "hooks": {"before_start": [*ENGINE, "rm", *where]},
    }
    if stop:
        scheme["stop_command"] = [*ENGINE, "stop", *where]
    return {"schemes": {"GPU": scheme}, **extra}


GPU = [{"name": "test gpu", "kind": "cuda", "memory_total_mib": 8000}]


def container_pid(state: Path, name: str) -> int:
    return read_pids(state / f"llm-{name}.pid")[0]


async def test_container_engine_is_gone_after_stop_eviction_and_crash(
    tmp_path: Path, spawn_log: Path
) -> None:
    state = tmp_path / "containers"
    loaded = make_config(
        tmp_path,
        {
            "a": container_model(state, spawn_log),
            "b": container_model(state, spawn_log, queue_timeout="5s"),
        },
        devices=GPU,
    )
    async with running_manager(loaded) as mgr:
        a, b = mgr.supervisor.resolve("a"), mgr.supervisor.resolve("b")
        # A stop.
        assert (await mgr.post("/api/models/a/start"))[0] == 200
        container = container_pid(state, "a")
        assert alive(container) and container != a.pid
        assert (await mgr.post("/api/models/a/stop"))[0] == 200
        assert not alive(container)
        # An eviction: b needs a's memory.
        assert (await mgr.post("/api/models/a/start"))[0] == 200
        container = container_pid(state, "a")
        assert (await mgr.post("/api/models/b/start"))[0] == 200
        assert a.state is State.STOPPED
        assert not alive(container)
        # A crash: the client dies (kill -9); the container would live on.
        container = container_pid(state, "b")
        client = b.pid
        assert client is not None
        subprocess.run(["kill", "-9", str(client)], check=True)
        await wait_until(lambda: b.state is State.FAILED)
        assert b.failure_reason == "process exited with code -9"
        assert not alive(container)
        stops = (state / "stops.log").read_text().splitlines()
        assert [line.split()[1] for line in stops] == ["llm-a", "llm-a", "llm-b"]
        assert any("[stop_command] stopped container llm-b" in m for m in messages(mgr, "b"))


async def test_without_stop_command_the_container_is_left_behind(
    tmp_path: Path, spawn_log: Path
) -> None:
    # The simulation is faithful: signals and the reaper do not reach the container.
    state = tmp_path / "containers"
    loaded = make_config(
        tmp_path, {"a": container_model(state, spawn_log, stop=False)}, devices=GPU
    )
    async with running_manager(loaded) as mgr:
        assert (await mgr.post("/api/models/a/start"))[0] == 200
        container = container_pid(state, "a")
        assert (await mgr.post("/api/models/a/stop"))[0] == 200
        assert alive(container)
        # Started again, its before_start (`rm -f`) cleans up what was left.
        assert (await mgr.post("/api/models/a/start"))[0] == 200
        assert not alive(container)
        container = container_pid(state, "a")
        await mgr.post("/api/models/a/stop")
    subprocess.run([*ENGINE, "rm", "--state", str(state), "--name", "llm-a"], check=True)
    assert not alive(container)


def test_run_state_runs_the_stop_command_left_by_a_killed_manager(
    tmp_path: Path, spawn_log: Path
) -> None:
    # The manager was killed (SIGKILL): the parent-death signal killed the client, the
    # container lives on. The next manager's start runs the recorded stop_command.
    state = tmp_path / "containers"
    where = ["--state", str(state), "--name", "llm-m"]
    port = "0"
    client = subprocess.Popen(
        [*ENGINE, "run", *where, "--port", port, "--spawn-log", str(spawn_log)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not (state / "llm-m.pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    container = container_pid(state, "m")
    data = tmp_path / "data"
    RunState(data).add(
        "m", client.pid, client.pid, stop={"argv": [*ENGINE, "stop", *where], "timeout": 10}
    )
    client.kill()
    client.wait()
    assert alive(container)
    killed = RunState(data).cleanup_previous()
    assert killed == []  # the client's group was already gone
    assert not alive(container)
    assert "stop llm-m" in (state / "stops.log").read_text()
