"""Live reload: unchanged models keep running, changed ones restart when idle, removed ones
stop, new ones appear; a bad file is refused and the running configuration kept."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from llm_manager.config import load_file
from llm_manager.models.runtime import State
from llm_manager.server import EarlySignals, _Server
from llm_manager.settings import resolve_paths
from tests.conftest import alive, fake_command, read_pids, running_manager, wait_until
from tests.test_server_process import launch


def model(spawn_log: Path, *switches: str) -> dict[str, Any]:
    return {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log), *switches)}}}


def write(path: Path, models: dict[str, Any], **server: Any) -> None:
    data = {"server": {"data_dir": str(path.parent / "data"), "stop_timeout": "2s", **server}}
    path.write_text(yaml.safe_dump({**data, "models": models}, sort_keys=False))


async def test_reload_keeps_unchanged_restarts_changed_when_idle_stops_removed(
    tmp_path: Path, spawn_log: Path
) -> None:
    config = tmp_path / "llm-manager.yaml"
    slow = ["--chunk-delay", "1.5"]
    write(
        config,
        {
            "keep": model(spawn_log, *slow),
            "change": model(spawn_log, *slow),
            "drop": model(spawn_log),
        },
    )
    async with running_manager(resolve_paths(load_file(config))) as mgr:
        for name in ("keep", "change", "drop"):
            assert (await mgr.post(f"/api/models/{name}/start"))[0] == 200
        keep, change, drop = (mgr.supervisor.resolve(n) for n in ("keep", "change", "drop"))
        keep_pid, change_pid, drop_pid = keep.pid, change.pid, drop.pid
        # Requests in flight on "keep" and "change" while the configuration changes.
        on_keep = asyncio.create_task(mgr.post("/v1/echo", json={"model": "keep"}))
        on_change = asyncio.create_task(mgr.post("/v1/echo", json={"model": "change"}))
        await wait_until(lambda: keep.pending == 1 and change.pending == 1)
        write(
            config,
            {
                "keep": model(spawn_log, *slow),
                "change": model(spawn_log, *slow, "--chunks", "3"),
                "new": model(spawn_log),
            },
        )
        status, report = await mgr.post("/api/config/reload")
        assert status == 200 and report["success"] is True
        assert report["unchanged"] == ["keep"] and report["added"] == ["new"]
        assert report["restart_pending"] == ["change"] and report["removed"] == ["drop"]
        assert report["restart_needed"] == []
        # Removed: gone from the API at once, stopped once idle.
        assert (await mgr.get("/api/models/drop/info"))[0] == 404
        await wait_until(lambda: drop.state is State.STOPPED)
        assert not alive(drop_pid)
        # Nothing in flight was dropped; "change" restarts only after its request ended.
        assert change.pid == change_pid
        assert (await on_keep)[0] == 200 and (await on_change)[0] == 200
        await wait_until(lambda: change.state is State.STOPPED, timeout=10)
        assert "--chunks" in mgr.supervisor.preview(change, []).command  # new definition
        assert keep.pid == keep_pid and keep.state is State.ROUTING
        _, listed = await mgr.get("/v1/models")
        assert [m["id"] for m in listed["data"]] == ["keep", "change", "new"]
        status, answer = await mgr.post("/v1/chat/completions", json={"model": "change"})
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
        await mgr.post("/api/models/stop-all")


async def test_bad_new_configuration_is_refused_and_old_one_kept(
    tmp_path: Path, spawn_log: Path
) -> None:
    config = tmp_path / "llm-manager.yaml"
    write(config, {"m": model(spawn_log)})
    async with running_manager(resolve_paths(load_file(config))) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        pid = mgr.supervisor.resolve("m").pid
        config.write_text("models:\n  m:\n    mode: talk\n    schemes: {}\n")
        status, body = await mgr.post("/api/config/reload")
        assert (
            status == 400
            and body["message"] == "the new configuration is invalid; the running one stays"
        )
        assert "models.m.mode (line 3)" in body["error"]
        assert mgr.supervisor.resolve("m").pid == pid
        assert (await mgr.post("/v1/chat/completions", json={"model": "m"}))[0] == 200
        await mgr.post("/api/models/stop-all")


async def test_timeouts_apply_live_and_server_keys_need_a_restart(
    tmp_path: Path, spawn_log: Path
) -> None:
    config = tmp_path / "llm-manager.yaml"
    write(config, {"m": model(spawn_log)})
    async with running_manager(resolve_paths(load_file(config))) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        write(config, {"m": model(spawn_log)}, idle_timeout="0.5s", max_body_bytes=10)
        status, report = await mgr.post("/api/config/reload")
        assert report["unchanged"] == ["m"]
        assert report["restart_needed"] == ["server.max_body_bytes"]
        runtime = mgr.supervisor.resolve("m")
        await wait_until(lambda: runtime.state is State.STOPPED, timeout=5)  # new idle timeout


def test_sighup_and_watch_reload_a_running_manager(tmp_path: Path, spawn_log: Path) -> None:
    config = tmp_path / "llm-manager.yaml"
    write(config, {"a": model(spawn_log)})
    m = launch(config, tmp_path)
    try:
        write(config, {"a": model(spawn_log), "b": model(spawn_log)})
        m.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if [x["id"] for x in m.get("/v1/models")["data"]] == ["a", "b"]:
                break
            time.sleep(0.1)
        assert [x["id"] for x in m.get("/v1/models")["data"]] == ["a", "b"]
        result = m.cli("reload", "--json")
        assert result.returncode == 0 and '"unchanged"' in result.stdout
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(30) == 0
    finally:
        if m.proc.poll() is None:
            m.proc.kill()
    # --watch: editing the file is enough.
    watcher = launch(config, tmp_path, "--watch")
    try:
        time.sleep(1.2)
        write(config, {"c": model(spawn_log)})
        deadline = time.monotonic() + 10
        while (
            "configuration reloaded" not in watcher.log.read_text() and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert "added: c" in watcher.log.read_text() and "removed: a, b" in watcher.log.read_text()
    finally:
        watcher.proc.terminate()
        assert watcher.proc.wait(30) == 0
    assert not any(alive(p) for p in read_pids(spawn_log))


async def test_a_new_store_or_cluster_needs_a_restart(tmp_path: Path, spawn_log: Path) -> None:
    config = tmp_path / "llm-manager.yaml"
    write(config, {"m": model(spawn_log)})
    async with running_manager(resolve_paths(load_file(config))) as mgr:
        data = yaml.safe_load(config.read_text())
        data["store"] = "postgresql://llm@db.invalid/x"
        data["cluster"] = {"address": "10.0.0.5:6379"}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        status, report = await mgr.post("/api/config/reload")
        assert status == 200, report
        assert report["restart_needed"] == ["cluster", "store"]
        # Nothing was joined or opened: the running store and device readings stay.
        assert mgr.app.cluster is None
        assert mgr.app.db.status()["store"].endswith("llm-manager.db")


async def test_a_sighup_before_the_handlers_are_in_place_is_not_lost() -> None:
    # `llm-manager serve` logs where it listens before the server installs its own signal
    # handlers; a SIGHUP sent on seeing that line used to be ignored (seen in make test).
    early = EarlySignals()
    sigs = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in sigs}
    try:
        early.install()
        signal.raise_signal(signal.SIGHUP)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert early.reload_asked
    reloads: list[str] = []
    server = _Server(uvicorn.Config(app=None), early, on_reload=lambda: reloads.append("r"))
    with server.capture_signals():
        assert reloads == ["r"] and not early.reload_asked
    assert not server.should_exit  # a reload, not a stop
