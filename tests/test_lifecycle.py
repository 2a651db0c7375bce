"""Model lifecycle with real child processes on real ports (the fake model server)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import psutil

from llm_manager.models.runtime import State
from tests.conftest import (
    alive,
    fake_command,
    make_config,
    read_pids,
    running_manager,
    wait_until,
)


def model(*switches: str, **extra: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "schemes": {"CPU": {"devices": {"cpu": 0}, "command": fake_command(*switches)}}
    }
    spec.update(extra)
    return spec


async def test_twenty_concurrent_starts_spawn_one_process(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(
        tmp_path, {"m": model("--slow-start", "0.5", "--spawn-log", str(spawn_log))}
    )
    async with running_manager(loaded) as mgr:
        results = await asyncio.gather(*(mgr.post("/api/models/m/start") for _ in range(20)))
        assert all(status == 200 and body["success"] for status, body in results)
        assert len(read_pids(spawn_log)) == 1
        status, body = await mgr.get("/api/models/m/info")
        assert body["model"]["status"] == "routing"
        assert body["model"]["pid"] == read_pids(spawn_log)[0]
        # Starting a routing model again spawns nothing.
        status, body = await mgr.post("/api/models/m/start")
        assert status == 200 and "already running" in body["message"]
        assert len(read_pids(spawn_log)) == 1


async def test_stop_kills_group_with_grandchild_and_sigterm_ignorer(
    tmp_path: Path, spawn_log: Path
) -> None:
    cmd = model("--ignore-sigterm", "--fork-grandchild", "--spawn-log", str(spawn_log))
    loaded = make_config(tmp_path, {"m": cmd}, stop_timeout="1s")
    async with running_manager(loaded) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        grandchild_log = spawn_log.with_name(spawn_log.name + ".grandchild")
        await wait_until(lambda: bool(read_pids(grandchild_log)))
        child, grandchild = read_pids(spawn_log)[0], read_pids(grandchild_log)[0]
        assert alive(child) and alive(grandchild)
        began = time.monotonic()
        status, body = await mgr.post("/api/models/m/stop")
        assert status == 200 and body["success"] is True
        assert not alive(child) and not alive(grandchild)
        # SIGTERM was ignored: the kill came after stop_timeout, not much later.
        assert 0.9 <= time.monotonic() - began < 5
        status, body = await mgr.get("/api/models/m/info")
        assert body["model"]["status"] == "stopped" and body["model"]["pid"] is None


async def test_never_healthy_fails_after_startup_timeout(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(
        tmp_path,
        {"m": model("--never-healthy", "--spawn-log", str(spawn_log))},
        startup_timeout="1.5s",
    )
    async with running_manager(loaded) as mgr:
        began = time.monotonic()
        status, body = await mgr.post("/api/models/m/start")
        elapsed = time.monotonic() - began
        assert status == 503
        assert body["success"] is False and "not ready after 1.5 s" in body["message"]
        assert 1.4 <= elapsed < 6
        assert not alive(read_pids(spawn_log)[0])
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["status"] == "failed"
        assert "startup_timeout" in info["model"]["failure_reason"]


async def test_exit_during_start_fails_at_once(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(
        tmp_path, {"m": model("--exit-at-start", "4", "--spawn-log", str(spawn_log))}
    )
    async with running_manager(loaded) as mgr:
        began = time.monotonic()
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "exited with code 4" in body["message"]
        assert time.monotonic() - began < 5  # not the 300 s startup_timeout
        messages = [line.message for line in mgr.supervisor.resolve("m").log.lines()]
        assert any("exiting at start as asked" in m for m in messages), messages


async def test_crash_sets_failed_with_exit_code_and_next_start_works(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(
        tmp_path, {"m": model("--exit-after", "0.5", "--spawn-log", str(spawn_log))}
    )
    async with running_manager(loaded) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        runtime = mgr.supervisor.resolve("m")
        await wait_until(lambda: runtime.state is State.FAILED)
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["status"] == "failed"
        assert info["model"]["failure_reason"] == "process exited with code 3"
        assert info["model"]["pid"] is None
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        assert len(read_pids(spawn_log)) == 2
        await mgr.post("/api/models/m/stop")


async def test_idle_unload_stops_idle_model_but_not_one_with_pending_requests(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(
        tmp_path,
        {
            "idle": model("--spawn-log", str(spawn_log), idle_timeout="0.5s"),
            "busy": model("--spawn-log", str(spawn_log), idle_timeout="0.5s"),
            "never": model("--spawn-log", str(spawn_log), idle_timeout=0),
        },
    )
    async with running_manager(loaded) as mgr:
        busy = mgr.supervisor.resolve("busy")
        busy.acquire()  # a request waiting and then in flight, from before its start
        for name in ("busy", "idle", "never"):
            assert (await mgr.post(f"/api/models/{name}/start"))[0] == 200
        idle = mgr.supervisor.resolve("idle")
        await wait_until(lambda: idle.state is State.STOPPED, timeout=5)
        await asyncio.sleep(0.6)
        assert busy.state is State.ROUTING
        assert mgr.supervisor.resolve("never").state is State.ROUTING
        busy.release()
        await wait_until(lambda: busy.state is State.STOPPED, timeout=5)
        assert mgr.supervisor.resolve("never").state is State.ROUTING
        messages = [line.message for line in idle.log.lines()]
        assert any("stopping: idle" in m for m in messages), messages


async def test_scheme_fallback_when_first_device_is_absent(tmp_path: Path, spawn_log: Path) -> None:
    spec = {
        "schemes": {
            "V100": {
                "devices": {"v100": 16000},
                "command": fake_command("--spawn-log", str(spawn_log)),
            },
            "RTX": {
                "devices": {"rtx 4060": 6000},
                "command": fake_command("--spawn-log", str(spawn_log)),
            },
        }
    }
    loaded = make_config(
        tmp_path,
        {"m": spec},
        devices=[{"name": "NVIDIA GeForce RTX 4060", "kind": "cuda", "memory_total_mib": 8192}],
    )
    async with running_manager(loaded) as mgr:
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["is_available"] is True
        assert info["model"]["config_source"] == "RTX"
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        _, info = await mgr.get("/api/models/m/info")
        assert info["model"]["config_source"] == "RTX"
        assert "--port" in info["model"]["current_bat_path"]
        await mgr.post("/api/models/m/stop")


async def test_too_much_memory_is_503_with_clear_message(tmp_path: Path, spawn_log: Path) -> None:
    spec = {
        "schemes": {
            "CPU": {
                "devices": {"cpu": 10**9},
                "command": fake_command("--spawn-log", str(spawn_log)),
            }
        }
    }
    loaded = make_config(tmp_path, {"m": spec})
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503
        assert body["message"] == "device unavailable or insufficient resources"
        assert "device 'cpu' needs 1000000000 MiB" in body["error"]
        assert read_pids(spawn_log) == []  # nothing was spawned
        # Declared-device memory is booked: a second model cannot take what the first holds.


async def test_declared_device_memory_is_booked_and_idle_holder_evicted(
    tmp_path: Path, spawn_log: Path
) -> None:
    def on_gpu(mib: int) -> dict[str, object]:
        return {
            "schemes": {
                "GPU": {
                    "devices": {"gpu": mib},
                    "command": fake_command("--spawn-log", str(spawn_log)),
                }
            }
        }

    loaded = make_config(
        tmp_path,
        {"a": on_gpu(6000), "b": {**on_gpu(6000), "queue_timeout": "0.5s"}},
        devices=[{"name": "test gpu", "kind": "cuda", "memory_total_mib": 8000}],
    )
    async with running_manager(loaded) as mgr:
        assert (await mgr.post("/api/models/a/start"))[0] == 200
        a = mgr.supervisor.resolve("a")
        assert a.try_admit()  # a request in flight: busy, must not be evicted
        status, body = await mgr.post("/api/models/b/start")
        assert status == 503 and "queue_timeout" in body["message"] and "a" in body["message"]
        assert mgr.supervisor.resolve("b").state is State.STOPPED  # no room is not a failure
        a.dismiss()  # now idle: b's start evicts it
        assert (await mgr.post("/api/models/b/start"))[0] == 200
        assert a.state is State.STOPPED
        assert any("evicted to make room for b" in line.message for line in a.log.lines())
        await mgr.post("/api/models/stop-all")


async def test_port_in_use_fails_fast_naming_the_port(tmp_path: Path, spawn_log: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        loaded = make_config(tmp_path, {"m": model("--spawn-log", str(spawn_log), port=port)})
        async with running_manager(loaded) as mgr:
            status, body = await mgr.post("/api/models/m/start")
            assert status == 503
            assert f"port {port} is already in use" in body["message"]
            assert read_pids(spawn_log) == []


async def test_health_404_falls_back_to_v1_models(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": model("--no-health", "--spawn-log", str(spawn_log))})
    async with running_manager(loaded) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        await mgr.post("/api/models/m/stop")


async def test_stop_during_start_cancels_it(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": model("--never-healthy", "--spawn-log", str(spawn_log))})
    async with running_manager(loaded) as mgr:
        start = asyncio.create_task(mgr.post("/api/models/m/start"))
        await wait_until(lambda: bool(read_pids(spawn_log)))
        status, body = await mgr.post("/api/models/m/stop")
        assert status == 200
        status, body = await start
        assert status == 502 and "stopped while starting" in body["message"]
        assert not alive(read_pids(spawn_log)[0])
        assert mgr.supervisor.resolve("m").state is State.STOPPED


async def test_stop_all_and_restart_autostart(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(
        tmp_path,
        {
            "auto": model("--spawn-log", str(spawn_log), auto_start=True),
            "manual": model("--spawn-log", str(spawn_log)),
        },
    )
    async with running_manager(loaded) as mgr:
        auto = mgr.supervisor.resolve("auto")
        await wait_until(lambda: auto.state is State.ROUTING)  # started at boot
        assert mgr.supervisor.resolve("manual").state is State.STOPPED
        first_pid = auto.pid
        status, body = await mgr.post("/api/models/restart-autostart")
        assert status == 200
        assert body["started_models"] == ["auto"] and body["success"] is True
        assert auto.pid != first_pid and not alive(first_pid)
        assert (await mgr.post("/api/models/manual/start"))[0] == 200
        status, body = await mgr.post("/api/models/stop-all")
        assert status == 200 and body["success"] is True
        assert all(r.state is State.STOPPED for r in mgr.supervisor.runtimes)
        assert not any(alive(pid) for pid in read_pids(spawn_log))
        assert not [
            p
            for p in psutil.Process().children(recursive=True)
            if "fake_model" in " ".join(p.cmdline())
        ]


async def test_gpu_indices_of_the_chosen_devices_reach_the_model(
    tmp_path: Path, spawn_log: Path
) -> None:
    def on(devices: dict[str, int], **env: str) -> dict[str, object]:
        scheme: dict[str, object] = {
            "devices": devices,
            "command": fake_command("--spawn-log", str(spawn_log)),
        }
        if env:
            scheme["env"] = env
        return {"schemes": {"GPU": scheme}}

    loaded = make_config(
        tmp_path,
        {
            "two": on({"rtx": 1000, "cuda:1": 5000}),
            "own": on({"cuda:1": 10}, CUDA_VISIBLE_DEVICES="7"),
        },
        devices=[
            {"name": "RTX 3090", "kind": "cuda", "memory_total_mib": 24000, "index": 0},
            {"name": "Tesla V100", "kind": "cuda", "memory_total_mib": 16000, "index": 1},
        ],
    )
    async with running_manager(loaded) as mgr:
        for name, expected in (
            ("two", "CUDA_VISIBLE_DEVICES=0,1"),
            ("own", "CUDA_VISIBLE_DEVICES=7"),
        ):
            assert (await mgr.post(f"/api/models/{name}/start"))[0] == 200
            runtime = mgr.supervisor.resolve(name)
            await wait_until(lambda r=runtime: any("CUDA" in x.message for x in r.log.lines()))
            lines = [x.message for x in runtime.log.lines() if x.message.startswith("CUDA")]
            assert lines == [expected]
        await mgr.post("/api/models/stop-all")


async def test_relative_command_path_resolves_against_config_dir(tmp_path: Path) -> None:
    script = tmp_path / "bin" / "engine"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nexit 5\n")
    script.chmod(0o755)
    loaded = make_config(tmp_path, {"m": {"schemes": {"CPU": {"command": "./bin/engine"}}}})
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "exited with code 5" in body["message"]
    loaded = make_config(tmp_path, {"m": {"schemes": {"CPU": {"command": "./bin/missing"}}}})
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "bin/missing' does not exist" in body["message"]


async def test_restart_autostart_failure_is_503(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(
        tmp_path,
        {
            "good": model("--spawn-log", str(spawn_log), auto_start=True),
            "bad": model("--exit-at-start", "9", auto_start=True),
        },
    )
    async with running_manager(loaded) as mgr:
        good = mgr.supervisor.resolve("good")
        await wait_until(lambda: good.state is State.ROUTING)
        status, body = await mgr.post("/api/models/restart-autostart")
        assert status == 503 and body["success"] is False
        assert body["started_models"] == ["good"]
        assert "exited with code 9" in body["failed_models"]["bad"]
        await mgr.post("/api/models/stop-all")


async def test_model_names_with_slashes(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"Qwen/Qwen3-8B": model("--spawn-log", str(spawn_log))})
    async with running_manager(loaded) as mgr:
        status, body = await mgr.get("/api/models/Qwen/Qwen3-8B/info")
        assert status == 200 and body["model"]["model_name"] == "Qwen/Qwen3-8B"
        status, body = await mgr.get("/api/models/Qwen%2FQwen3-8B/info")
        assert status == 200
        status, body = await mgr.get("/v1/models/Qwen/Qwen3-8B")
        assert status == 200 and body["id"] == "Qwen/Qwen3-8B"


async def test_first_request_is_forwarded_soon_after_the_model_turns_healthy(
    tmp_path: Path, spawn_log: Path
) -> None:
    """Readiness is probed often and at once when the model prints: no fixed 1-2 s poll."""
    loaded = make_config(
        tmp_path, {"m": model("--slow-start", "1.5", "--spawn-log", str(spawn_log))}
    )
    async with running_manager(loaded) as mgr:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            answered = time.time()
        model_log = mgr.supervisor.resolve("m").log

        def healthy_line() -> list[str]:
            return [x.message for x in model_log.lines() if x.message.startswith("healthy at ")]

        # Output is read in gatherings of up to 20 ms: the line may come after the answer.
        await wait_until(lambda: bool(healthy_line()))
        healthy = float(healthy_line()[0].split()[-1])
        # Probes run every 25 ms at most, and at once on the "healthy at" line itself.
        assert 0 <= answered - healthy < 0.15, answered - healthy
