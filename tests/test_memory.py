"""Memory measured, not guessed (issue 18), with real managers and real child processes:
footprints measured and kept across restarts, auto memory planned from a measurement or a
GGUF estimate, measurements deciding placement, headroom, and out-of-memory at start
recovered (or not) by stopping other models."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llm_manager.devices.cuda import CudaProvider
from llm_manager.models.launch import free_port
from llm_manager.models.runtime import ModelRuntime, State
from tests.conftest import RunningManager, fake_command, make_config, running_manager
from tests.test_devices import FakeNvml

ENGINE = Path(__file__).parent / "fakes" / "memory_engine.py"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def engine(*switches: str) -> list[str]:
    """The command line of the memory engine (tests/fakes/memory_engine.py)."""
    return [sys.executable, str(ENGINE), "--port", "{port}", "--name", "{name}", *switches]


def scheme(devices: dict[str, Any], command: list[str], name: str = "S") -> dict[str, Any]:
    return {"schemes": {name: {"devices": devices, "command": command}}}


def plus_ten_percent(mib: int) -> int:
    """A peak with the default memory_margin (10%, rounded up), in integers."""
    return mib + -(-mib // 10)


async def memory(mgr: RunningManager, name: str) -> dict[str, Any]:
    status, body = await mgr.get(f"/api/models/{name}/info")
    assert status == 200, body
    return dict(body["model"]["memory"])


async def model_info(mgr: RunningManager, name: str) -> dict[str, Any]:
    status, body = await mgr.get(f"/api/models/{name}/info")
    assert status == 200, body
    return dict(body["model"])


async def until_memory(
    mgr: RunningManager, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """The model's memory info once ``check`` holds (polled; fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        mem = await memory(mgr, name)
        if check(mem):
            return mem
        if time.monotonic() > deadline:
            raise AssertionError(f"memory of {name} never reached the condition: {mem}")
        await asyncio.sleep(0.1)


def log_of(mgr: RunningManager, name: str) -> list[str]:
    return [line.message for line in mgr.supervisor.resolve(name).log.lines()]


async def chat(mgr: RunningManager, name: str) -> tuple[int, Any]:
    return await mgr.post("/v1/chat/completions", json={"model": name, **CHAT})


def memory_series(metrics: str) -> list[tuple[dict[str, str], float]]:
    """The samples of llm_manager_model_memory_mib in a /metrics text: (labels, value)."""
    out = []
    for match in re.finditer(r"^llm_manager_model_memory_mib\{([^}]*)\} (\S+)$", metrics, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        out.append((labels, float(match.group(2))))
    return out


def state(mgr: RunningManager, name: str) -> State:
    runtime: ModelRuntime = mgr.supervisor.resolve(name)
    return runtime.state


# --- measured footprints --------------------------------------------------------------


async def test_footprint_measured_shown_and_kept_across_restarts(
    tmp_path: Path, spawn_log: Path
) -> None:
    command = engine(
        "--hold-mib", "200", "--grow-on-request-mib", "100", "--spawn-log", str(spawn_log)
    )
    models = {"m": scheme({"cpu": 64}, command)}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        # Read while it loads (from its first MiB) and after: the peak reaches what it holds.
        mem = await until_memory(mgr, "m", lambda m: (m["devices"]["cpu"]["load_peak"] or 0) >= 200)
        cpu = mem["devices"]["cpu"]
        # 200 MiB held and touched, plus the interpreter and aiohttp (about 40 MiB).
        assert cpu["load_peak"] < 200 + 120, cpu
        assert cpu["serve_peak"] is None and cpu["runs"] == 1, cpu
        assert (cpu["declared"], cpu["planned"], cpu["source"], cpu["booked"]) == (
            64,
            64,
            "declared",
            64,
        ), cpu  # a written number wins (measured_raises_declared is off)
        assert cpu["now"] is not None and cpu["now"] >= 200, cpu
        assert mem["host"] is None  # the scheme names cpu: no separate host row
        load_peak = cpu["load_peak"]

        status, body = await chat(mgr, "m")
        assert status == 200, body
        mem = await until_memory(
            mgr, "m", lambda m: (m["devices"]["cpu"]["serve_peak"] or 0) >= load_peak + 90
        )
        cpu = mem["devices"]["cpu"]
        serve_peak = cpu["serve_peak"]
        assert serve_peak < load_peak + 100 + 60, cpu  # the 100 MiB grown, not much more
        assert cpu["load_peak"] == load_peak, cpu  # the request did not count as loading
        assert mem["warnings"] == [f"cpu: measured {serve_peak} MiB, above the 64 MiB declared"], (
            mem
        )
        warned = [x for x in log_of(mgr, "m") if x.startswith("memory: measured")]
        assert len(warned) == 1, warned  # once per run, at the first reading above it
        assert re.fullmatch(
            r"memory: measured \d+ MiB on cpu, above the 64 MiB its scheme 'S' declares",
            warned[0],
        ), warned

        async with mgr.http.get(mgr.url + "/metrics") as resp:
            assert resp.status == 200
            metrics = await resp.text()
        values = {
            labels["figure"]: value
            for labels, value in memory_series(metrics)
            if (labels["model"], labels["scheme"], labels["device"]) == ("m", "S", "cpu")
        }
        assert values.get("load_peak") == load_peak, metrics
        assert values.get("serve_peak") == serve_peak, values
        assert values.get("declared") == 64 and values.get("booked") == 64, values
        assert "now" in values, values

    # A new manager on the same data_dir: the measurement is there before any start.
    async with running_manager(make_config(tmp_path, models)) as mgr:
        mem = await memory(mgr, "m")
        cpu = mem["devices"]["cpu"]
        assert (cpu["load_peak"], cpu["serve_peak"], cpu["runs"]) == (load_peak, serve_peak, 1)
        assert cpu["now"] is None and cpu["booked"] is None, cpu
        assert state(mgr, "m") is State.STOPPED

    # The same command with memory auto: planned from the peak plus 10%, and started so.
    auto = {"m": scheme({"cpu": "auto"}, command)}
    async with running_manager(make_config(tmp_path, auto)) as mgr:
        cpu = (await memory(mgr, "m"))["devices"]["cpu"]
        assert cpu["declared"] == "auto" and cpu["source"] == "measured", cpu
        assert cpu["planned"] == plus_ten_percent(serve_peak), (cpu, serve_peak)
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        cpu = (await memory(mgr, "m"))["devices"]["cpu"]
        assert cpu["booked"] == plus_ten_percent(serve_peak) and cpu["runs"] == 2, cpu

    # memory_margin in MiB: the peak plus that many.
    async with running_manager(make_config(tmp_path, auto, memory_margin="50MiB")) as mgr:
        cpu = (await memory(mgr, "m"))["devices"]["cpu"]
        assert (cpu["planned"], cpu["source"]) == (serve_peak + 50, "measured"), cpu

    # Another definition of the scheme (its command changed): earlier figures do not apply.
    changed = {"m": scheme({"cpu": "auto"}, [*command, "--hold-mib", "10"])}
    async with running_manager(make_config(tmp_path, changed)) as mgr:
        cpu = (await memory(mgr, "m"))["devices"]["cpu"]
        assert (cpu["load_peak"], cpu["serve_peak"], cpu["runs"]) == (None, None, 0), cpu
        assert (cpu["planned"], cpu["source"]) == (None, "none"), cpu


async def test_auto_memory_with_nothing_to_go_by_asks_for_a_number(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {"m": scheme({"cpu": "auto"}, engine("--spawn-log", str(spawn_log)))}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        cpu = (await memory(mgr, "m"))["devices"]["cpu"]
        assert (cpu["planned"], cpu["source"], cpu["estimate"]) == (None, "none", None), cpu
        status, body = await chat(mgr, "m")
        assert status == 503, body
        assert body["error"]["type"] == "device_unavailable", body
        message = body["error"]["message"]
        assert "memory on 'cpu' is auto" in message, message
        assert "write the MiB it needs (for example 'cpu: 8GiB')" in message, message
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "'cpu'" in body["error"], body
        info = await model_info(mgr, "m")
        assert info["status"] == "stopped" and info["failure_reason"] is None, info
    assert not spawn_log.exists()  # nothing was started


# --- placement ------------------------------------------------------------------------


async def _mirror_gpu(
    mgr: RunningManager, nvml: FakeNvml, sizes: dict[str, int], base: int = 0
) -> None:
    """Keep the fake GPU's per-process list (and its use) in step with the running models:
    each model's process shows the MiB given for it, as NVML would list it; ``base`` MiB
    are used by programs the manager does not manage."""
    while True:
        procs = [
            (r.pid, sizes[r.name])
            for r in mgr.supervisor.runtimes
            if r.pid is not None and r.name in sizes
        ]
        gpu = nvml.gpus[0]
        if procs != gpu["procs"]:
            gpu["procs"] = procs
            gpu["used"] = base + sum(mib for _, mib in procs)
            mgr.app.monitor._latest = None  # noqa: SLF001 - the next look reads it afresh
        await asyncio.sleep(0.02)


async def test_measured_peak_above_declared_decides_placement(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With measured_raises_declared, a model measured at 5000 MiB although it declares 3000
    is planned at 5500: it fitted beside another model by its declared number, and does not
    by its measured one, so its next start evicts that model."""
    nvml = FakeNvml([{"name": "Fake GPU", "total": 10000, "used": 0, "procs": []}])
    monkeypatch.setattr("llm_manager.app.CudaProvider", lambda: CudaProvider(nvml=nvml, smi=None))
    command = fake_command("--spawn-log", str(spawn_log))
    models = {
        "a": scheme({"cuda:0": 3000}, command),
        "b": scheme({"cuda:0": 5000}, command),
    }
    loaded = make_config(tmp_path, models, measured_raises_declared=True)
    async with running_manager(loaded) as mgr:
        mirror = asyncio.create_task(_mirror_gpu(mgr, nvml, {"a": 5000, "b": 4800}))
        try:
            assert (await mgr.post("/api/models/b/start"))[0] == 200
            await until_memory(mgr, "b", lambda m: m["devices"]["cuda:0"]["now"] == 4800)
            gpu = (await memory(mgr, "a"))["devices"]["cuda:0"]
            assert (gpu["planned"], gpu["source"]) == (3000, "declared"), gpu
            # By its declared 3000 MiB, a fits beside b (5200 MiB free).
            assert (await mgr.post("/api/models/a/start"))[0] == 200
            assert state(mgr, "b") is State.ROUTING
            mem = await until_memory(
                mgr, "a", lambda m: m["devices"]["cuda:0"]["load_peak"] == 5000
            )
            gpu = mem["devices"]["cuda:0"]
            assert gpu["booked"] == 3000, gpu  # this run was placed by the declared number
            assert (gpu["planned"], gpu["source"]) == (5500, "measured"), gpu
            assert mem["warnings"] == ["cuda:0: measured 5000 MiB, above the 3000 MiB declared"]
            assert any(
                x == "memory: measured 5000 MiB on cuda:0, above the 3000 MiB its scheme 'S' "
                "declares"
                for x in log_of(mgr, "a")
            ), log_of(mgr, "a")

            assert (await mgr.post("/api/models/a/stop"))[0] == 200
            await until_memory(mgr, "b", lambda m: m["devices"]["cuda:0"]["now"] == 4800)
            # Now planned at 5500: 5200 MiB free, less the 200 MiB b may still take (it
            # booked 5000, shows 4800) = 5000, too little: b is evicted.
            assert (await mgr.post("/api/models/a/start"))[0] == 200
            assert state(mgr, "b") is State.STOPPED
            assert any("evicted to make room for a" in x for x in log_of(mgr, "b")), log_of(
                mgr, "b"
            )
            assert any("evicting b to make room" in x for x in log_of(mgr, "a")), log_of(mgr, "a")
            gpu = (await memory(mgr, "a"))["devices"]["cuda:0"]
            assert gpu["booked"] == 5500 and gpu["runs"] == 2, gpu
        finally:
            mirror.cancel()


async def test_auto_planned_size_decides_whether_it_fits(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheme with ``cuda:0: auto`` measured on the GPU at 3000 MiB is planned at 3300:
    with 3200 MiB free it does not fit (503 naming the free MiB), with 3300 it does."""
    nvml = FakeNvml([{"name": "Fake GPU", "total": 8000, "used": 0, "procs": []}])
    monkeypatch.setattr("llm_manager.app.CudaProvider", lambda: CudaProvider(nvml=nvml, smi=None))
    command = fake_command("--spawn-log", str(spawn_log))
    declared = {"m": scheme({"cuda:0": 1000}, command)}
    async with running_manager(make_config(tmp_path, declared)) as mgr:
        mirror = asyncio.create_task(_mirror_gpu(mgr, nvml, {"m": 3000}))
        try:
            assert (await mgr.post("/api/models/m/start"))[0] == 200
            await until_memory(mgr, "m", lambda m: m["devices"]["cuda:0"]["load_peak"] == 3000)
        finally:
            mirror.cancel()
    nvml.gpus[0].update(procs=[], used=4800)  # memory held by a program we do not manage
    auto = {"m": scheme({"cuda:0": "auto"}, command)}
    async with running_manager(make_config(tmp_path, auto)) as mgr:
        gpu = (await memory(mgr, "m"))["devices"]["cuda:0"]
        assert (gpu["planned"], gpu["source"], gpu["load_peak"]) == (3300, "measured", 3000)
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503, body
        assert "needs 3300 MiB, 3200 MiB free" in body["error"], body
        assert state(mgr, "m") is State.STOPPED
        nvml.gpus[0]["used"] = 4700
        mgr.app.monitor._latest = None  # noqa: SLF001
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        assert (await memory(mgr, "m"))["devices"]["cuda:0"]["booked"] == 3300


async def test_headroom_keeps_memory_free(tmp_path: Path, spawn_log: Path) -> None:
    command = fake_command("--spawn-log", str(spawn_log))
    models = {
        "big": scheme({"testgpu": 800}, command),
        "small": scheme({"testgpu": 700}, command),
    }
    loaded = make_config(
        tmp_path,
        models,
        devices=[{"name": "testgpu", "memory_total_mib": 1000}],
        memory_headroom="30%",  # one value: every GPU
    )
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/big/start")
        assert status == 503, body
        assert "device 'testgpu' needs 800 MiB, 700 MiB free (100 MiB missing)" in body["error"]
        status, body = await chat(mgr, "big")
        assert status == 503 and body["error"]["type"] == "device_unavailable", body
        assert state(mgr, "big") is State.STOPPED
        assert (await mgr.post("/api/models/small/start"))[0] == 200  # 700 is all there is
        # A declared device cannot be read; system memory is measured for every model, and
        # shown apart ("host") when the scheme has no cpu key.
        mem = await until_memory(mgr, "small", lambda m: bool((m["host"] or {}).get("load_peak")))
        assert mem["host"]["now"] and mem["host"]["runs"] == 1, mem
        gpu = mem["devices"]["testgpu"]
        assert (gpu["booked"], gpu["now"], gpu["load_peak"], gpu["runs"]) == (700, None, None, 1)

    # Per device, by name, in MiB: the same 300 MiB kept free.
    by_name = make_config(
        tmp_path,
        models,
        devices=[{"name": "testgpu", "memory_total_mib": 1000}],
        memory_headroom={"testgpu": "300MiB"},
    )
    async with running_manager(by_name) as mgr:
        status, body = await mgr.post("/api/models/big/start")
        assert status == 503, body
        assert "device 'testgpu' needs 800 MiB, 700 MiB free (100 MiB missing)" in body["error"]

    cpu_total = 0
    async with running_manager(make_config(tmp_path, {})) as mgr:
        status, body = await mgr.get("/api/devices/info")
        cpu_total = body["devices"]["cpu"]["info"]["memory_total"]
    # Headroom on system memory (cpu), as a percentage of its total: 99% leaves less than
    # the 1% of the total a scheme asks for.
    asks = -(-cpu_total // 100) + 1
    cpu_models = {"m": scheme({"cpu": asks}, command)}
    loaded = make_config(tmp_path, cpu_models, memory_headroom={"cpu": "99%"})
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503, body
        assert re.search(rf"device 'cpu' needs {asks} MiB, \d+ MiB free", body["error"]), body


# --- out of memory at start -------------------------------------------------------------


def oom_models(
    spawn_log: Path, listen_port: int, *b_switches: str, **a_extra: Any
) -> dict[str, Any]:
    """a: an idle model on the declared GPU, on a fixed port; b: an engine that runs out of
    memory at start while something listens on ``listen_port``."""
    a_port = a_extra.pop("port", listen_port)
    return {
        "a": {
            **scheme({"testgpu": 1000}, fake_command("--spawn-log", str(spawn_log))),
            "port": a_port,
            **a_extra,
        },
        "b": scheme(
            {"testgpu": 1000},
            engine(
                "--oom-if-listening", str(listen_port), "--spawn-log", str(spawn_log), *b_switches
            ),
        ),
    }


GPU8000 = [{"name": "testgpu", "memory_total_mib": 8000}]


@pytest.mark.parametrize(
    ("oom_by", "evidence"),
    [
        ("print", "it printed: ggml_backend_cuda_buffer_type_alloc_buffer: allocating 6144.00"),
        ("sigkill", "it was killed by SIGKILL, as the kernel's out-of-memory killer does"),
    ],
    ids=["printed", "sigkill"],
)
async def test_out_of_memory_at_start_evicts_and_starts_once_more(
    tmp_path: Path, spawn_log: Path, oom_by: str, evidence: str
) -> None:
    a_port = free_port()
    models = oom_models(spawn_log, a_port, "--oom-by", oom_by)
    loaded = make_config(tmp_path, models, devices=GPU8000)
    async with running_manager(loaded) as mgr:
        assert (await mgr.post("/api/models/a/start"))[0] == 200
        status, body = await chat(mgr, "b")
        assert status == 200, body
        assert state(mgr, "a") is State.STOPPED and state(mgr, "b") is State.ROUTING
        assert any("evicted: b ran out of memory while starting" in x for x in log_of(mgr, "a")), (
            log_of(mgr, "a")
        )
        b_log = log_of(mgr, "b")
        assert sum(x.startswith("starting with scheme") for x in b_log) == 2, b_log
        assert any(x.startswith(f"out of memory while starting ({evidence}") for x in b_log), b_log
        assert "stopped a to make room; starting once more" in b_log, b_log
        info = await model_info(mgr, "b")
        assert info["failure_reason"] is None and info["start_count"] == 1, info


async def test_out_of_memory_at_start_with_only_pinned_models_fails(
    tmp_path: Path, spawn_log: Path
) -> None:
    a_port = free_port()
    loaded = make_config(tmp_path, oom_models(spawn_log, a_port, pinned=True), devices=GPU8000)
    async with running_manager(loaded) as mgr:
        await mgr.post("/api/models/a/start")  # pinned: may be started by the manager already
        assert state(mgr, "a") is State.ROUTING
        status, body = await chat(mgr, "b")
        assert status == 503 and body["error"]["type"] == "start_failed", body
        info = await model_info(mgr, "b")
        assert info["status"] == "failed", info
        reason = info["failure_reason"]
        assert "ran out of memory while starting (it printed: ggml_backend_cuda" in reason, reason
        assert "no other model could be stopped to make room" in reason, reason
        assert "static:testgpu (testgpu): " in reason and "a 1000 MiB (pinned)" in reason, reason
        # a books 1000 of the 8000 MiB the device is declared with.
        assert (
            "static:testgpu (testgpu): 1000 of 8000 MiB in use or booked, 7000 MiB free" in reason
        ), reason
        assert state(mgr, "a") is State.ROUTING
        b_log = log_of(mgr, "b")
        assert sum(x.startswith("starting with scheme") for x in b_log) == 1, b_log
        status, body = await chat(mgr, "a")
        assert status == 200, body  # a was left alone, and serves


async def test_out_of_memory_again_after_evicting_fails(tmp_path: Path, spawn_log: Path) -> None:
    with socket.socket() as listener:  # memory taken by something that is not a model
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        models = oom_models(spawn_log, port, port=free_port())
        models["c"] = models.pop("a")
        loaded = make_config(tmp_path, models, devices=GPU8000)
        async with running_manager(loaded) as mgr:
            assert (await mgr.post("/api/models/c/start"))[0] == 200
            status, body = await chat(mgr, "b")
            assert status == 503 and body["error"]["type"] == "start_failed", body
            assert state(mgr, "c") is State.STOPPED and state(mgr, "b") is State.FAILED
            reason = (await model_info(mgr, "b"))["failure_reason"]
            assert (
                "ran out of memory while starting, again after c stopped to make room "
                "(it printed: ggml_backend_cuda" in reason
            ), reason
            assert "static:testgpu (testgpu): " in reason, reason
            b_log = log_of(mgr, "b")
            assert sum(x.startswith("starting with scheme") for x in b_log) == 2, b_log


async def test_start_failure_without_out_of_memory_is_not_retried(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {
        "c": scheme({"testgpu": 1000}, fake_command("--spawn-log", str(spawn_log))),
        "b": scheme({"testgpu": 1000}, fake_command("--exit-at-start", "1")),
    }
    async with running_manager(make_config(tmp_path, models, devices=GPU8000)) as mgr:
        assert (await mgr.post("/api/models/c/start"))[0] == 200
        status, body = await chat(mgr, "b")
        assert status == 503 and body["error"]["type"] == "start_failed", body
        b_log = log_of(mgr, "b")
        assert sum(x.startswith("starting with scheme") for x in b_log) == 1, b_log
        assert not any("out of memory" in x for x in b_log), b_log
        assert state(mgr, "c") is State.ROUTING and state(mgr, "b") is State.FAILED
        assert not any("evicted" in x for x in log_of(mgr, "c")), log_of(mgr, "c")


# --- the real llama.cpp engine ------------------------------------------------------------


async def test_llama_cpp_auto_memory_from_estimate_then_measured(
    tmp_path: Path, tiny_models: Any
) -> None:
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    from tests.test_gateway_llama import engine as llama_engine

    models = {"tiny": scheme({"cpu": "auto"}, llama_engine(tiny_models.chat), name="CPU")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        # The estimate is read ahead, in a thread, as the manager starts.
        mem = await until_memory(mgr, "tiny", lambda m: m["devices"]["cpu"]["estimate"] is not None)
        cpu = mem["devices"]["cpu"]
        estimate = cpu["estimate"]
        assert mem["estimate_error"] is None, mem
        assert isinstance(estimate, int) and estimate > 0, cpu
        assert (cpu["source"], cpu["planned"], cpu["runs"]) == (
            "estimate",
            plus_ten_percent(estimate),
            0,
        ), cpu
        assert (await mgr.post("/api/models/tiny/start"))[0] == 200
        cpu = (await memory(mgr, "tiny"))["devices"]["cpu"]
        assert cpu["booked"] == plus_ten_percent(estimate), cpu
        status, body = await chat(mgr, "tiny")
        assert status == 200, body
        await until_memory(mgr, "tiny", lambda m: m["devices"]["cpu"]["serve_peak"] is not None)
        assert (await mgr.post("/api/models/tiny/stop"))[0] == 200
        cpu = (await memory(mgr, "tiny"))["devices"]["cpu"]
        peak = max(cpu["load_peak"], cpu["serve_peak"])
        compared = f"estimate {estimate} MiB, measured load {cpu['load_peak']} / serve {peak} MiB"
        assert (cpu["source"], cpu["planned"]) == ("measured", plus_ten_percent(peak)), compared
        assert (await mgr.post("/api/models/tiny/start"))[0] == 200
        cpu = (await memory(mgr, "tiny"))["devices"]["cpu"]
        assert (cpu["booked"], cpu["runs"]) == (plus_ten_percent(peak), 2), compared
        print(compared)


async def test_estimate_follows_a_reload_that_changes_the_devices(
    tmp_path: Path, tiny_models: Any
) -> None:
    from tests.test_gateway_llama import engine as llama_engine

    command = llama_engine(tiny_models.chat, "-ngl", "99")
    one = {"t": scheme({"cpu": "auto"}, command)}
    two = {"t": scheme({"testgpu": "auto", "cpu": "auto"}, command)}
    gpu = [{"name": "testgpu", "memory_total_mib": 8000}]

    def estimated(mem: dict[str, Any]) -> bool:
        return all(row["source"] == "estimate" for row in mem["devices"].values())

    async with running_manager(make_config(tmp_path, two, devices=gpu)) as mgr:
        fresh = (await until_memory(mgr, "t", estimated))["devices"]  # a new manager's
    async with running_manager(make_config(tmp_path, one, devices=gpu)) as mgr:
        await until_memory(mgr, "t", estimated)
        report = mgr.supervisor.reload(make_config(tmp_path, two, devices=gpu))
        assert report["changed"] == ["t"], report
        # Read again after the reload (in a thread): as a new manager reads it.
        await until_memory(mgr, "t", lambda m: m["devices"] == fresh, timeout=2)


async def test_exit_while_the_gpu_reads_full_is_out_of_memory(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine that ends during its start without a word, while a GPU it was placed on
    reads full (here: memory of a program the manager does not manage, a, and itself), is
    taken to have run out of memory: the idle model on that GPU is stopped and the start
    tried once more. The second try ends the same way with room to spare: not memory, so
    that failure is reported as it is."""
    nvml = FakeNvml([{"name": "Fake GPU", "total": 8000, "used": 5900, "procs": []}])
    monkeypatch.setattr("llm_manager.app.CudaProvider", lambda: CudaProvider(nvml=nvml, smi=None))
    dies = fake_command("--spawn-log", str(spawn_log), "--slow-start", "5", "--exit-after", "1.5")
    models = {
        "a": scheme({"cuda:0": 1000}, fake_command("--spawn-log", str(spawn_log))),
        "b": scheme({"cuda:0": 1000}, dies),
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        mirror = asyncio.create_task(_mirror_gpu(mgr, nvml, {"a": 1000, "b": 1000}, base=5900))
        try:
            assert (await mgr.post("/api/models/a/start"))[0] == 200
            status, body = await mgr.post("/api/models/b/start")
            assert status == 503, body
            lines = log_of(mgr, "b")
            full = "cuda:0 (Fake GPU) read full: 100 MiB free of 8000"
            assert f"out of memory while starting (it exited with code 3 while {full})" in lines
            assert "stopped a to make room; starting once more" in lines, lines
            assert state(mgr, "a") is State.STOPPED
            assert sum(x.startswith("starting with scheme") for x in lines) == 2, lines
            reason = (await model_info(mgr, "b"))["failure_reason"]
            assert reason == "model 'b' exited with code 3 during start", reason
        finally:
            mirror.cancel()


async def test_measurements_can_be_forgotten(tmp_path: Path, spawn_log: Path) -> None:
    """POST /api/models/{alias}/memory/reset drops a model's footprints, kept and stored:
    an auto scheme is then refused until measured again (or given a number); a running
    model is measured afresh from its next reading; other models keep theirs."""
    command = engine("--hold-mib", "50", "--spawn-log", str(spawn_log))
    models = {"m": scheme({"cpu": 16}, command), "k": scheme({"cpu": 16}, command)}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        for name in ("m", "k"):
            assert (await mgr.post(f"/api/models/{name}/start"))[0] == 200
            await until_memory(mgr, name, lambda m: (m["devices"]["cpu"]["load_peak"] or 0) >= 50)
        assert (await mgr.post("/api/models/m/stop"))[0] == 200
        status, body = await mgr.post("/api/models/m/memory/reset")
        assert status == 200 and body["forgotten"] == 1, body
        assert "forgot 1 measured footprint" in body["message"], body
        cpu = (await memory(mgr, "m"))["devices"]["cpu"]
        assert (cpu["load_peak"], cpu["serve_peak"], cpu["runs"]) == (None, None, 0), cpu
        assert (await memory(mgr, "k"))["devices"]["cpu"]["runs"] == 1
        # A running model: measured again from its next reading on.
        assert (await mgr.post("/api/models/k/memory/reset"))[1]["forgotten"] == 1
        await until_memory(mgr, "k", lambda m: (m["devices"]["cpu"]["load_peak"] or 0) >= 50)
        status, body = await mgr.post("/api/models/nope/memory/reset")
        assert status == 404, body
    auto = {"m": scheme({"cpu": "auto"}, command)}
    async with running_manager(make_config(tmp_path, auto)) as mgr:  # the rows are gone too
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "memory on 'cpu' is auto" in body["error"], body
