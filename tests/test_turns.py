"""Models taking turns on a device that holds one at a time: real manager, real fake model
processes, a declared device. A request for a model that does not fit waits while the
models holding the memory are busy; nothing fails because another model is busy."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from llm_manager.cli.main import cli
from llm_manager.config import ConfigError, parse_text
from llm_manager.models.runtime import State
from tests.conftest import (
    RunningManager,
    fake_command,
    make_config,
    read_pids,
    running_manager,
    wait_until,
)

GPU = [{"name": "test gpu", "kind": "cuda", "memory_total_mib": 8000}]


def on_gpu(spawn_log: Path, mib: int = 6000, *switches: str, **extra: Any) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log), *switches)
    return {"schemes": {"GPU": {"devices": {"gpu": mib}, "command": command}}, **extra}


def slow_streamer(spawn_log: Path) -> dict[str, Any]:
    """A model filling most of the GPU whose streamed answers take about a second."""
    return on_gpu(spawn_log, 6000, "--chunks", "10", "--chunk-delay", "0.1")


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def stream_text(mgr: RunningManager, model: str) -> tuple[int, str]:
    async with mgr.http.post(mgr.url + "/v1/chat/completions", json=chat(model, True)) as resp:
        return resp.status, (await resp.read()).decode()


async def complete(mgr: RunningManager, model: str) -> tuple[int, float]:
    began = time.monotonic()
    async with mgr.http.post(mgr.url + "/v1/chat/completions", json=chat(model)) as resp:
        await resp.read()
        return resp.status, time.monotonic() - began


def starts(mgr: RunningManager) -> int:
    return sum(r.start_count for r in mgr.supervisor.runtimes)


async def test_b_waits_while_a_streams_then_a_is_evicted(tmp_path: Path, spawn_log: Path) -> None:
    models = {
        "a": slow_streamer(spawn_log),
        "b": on_gpu(spawn_log),
    }
    async with running_manager(make_config(tmp_path, models, devices=GPU)) as mgr:
        a, b = mgr.supervisor.resolve("a"), mgr.supervisor.resolve("b")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.state is State.ROUTING and a.admitted == 1)
        waiting = asyncio.create_task(complete(mgr, "b"))
        await wait_until(lambda: b.waiting_for == ("a",))
        _, info = await mgr.get("/api/models/b/info")
        assert info["model"]["waiting"] == 1 and info["model"]["waiting_for"] == ["a"]
        assert info["model"]["status"] == "starting"
        _, info = await mgr.get("/api/models/a/info")
        assert info["model"]["turn_ends_in_sec"] is not None
        async with mgr.http.get(mgr.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'llm_manager_waiting_requests{model="b"} 1.0' in metrics
        assert 'llm_manager_model_waiting_for_room{model="b"} 1.0' in metrics

        status, text = await streaming
        assert status == 200
        assert [f"tok{i} " in text for i in range(10)] == [True] * 10
        assert text.endswith("data: [DONE]\n\n") and "error" not in text
        status, _ = await waiting
        assert status == 200
        assert a.state is State.STOPPED and b.state is State.ROUTING
        assert any("evicted to make room for b" in x.message for x in a.log.lines())
        assert any(
            "waiting for room: a (1 request(s) in flight)" in x.message for x in b.log.lines()
        )
        async with mgr.http.get(mgr.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'llm_manager_queue_wait_seconds_count{model="b"} 1.0' in metrics
        await mgr.post("/api/models/stop-all")


async def _agents(
    mgr: RunningManager, names: list[str], agents: int, rounds: int
) -> list[tuple[int, float]]:
    async def agent(i: int) -> list[tuple[int, float]]:
        out = []
        for r in range(rounds):
            out.append(await complete(mgr, names[(i + r) % len(names)]))
        return out

    results = await asyncio.gather(*(agent(i) for i in range(agents)))
    return [x for per_agent in results for x in per_agent]


@pytest.mark.parametrize(("agents", "count"), [(2, 2), (4, 3)])
async def test_alternating_agents_are_served_in_batches(
    tmp_path: Path, spawn_log: Path, agents: int, count: int
) -> None:
    names = ["m0", "m1", "m2"][:count]
    models = {n: on_gpu(spawn_log, 6000, "--chunk-delay", "0.05") for n in names}
    rounds = 6
    loaded = make_config(tmp_path, models, devices=GPU, turn_time="1s", turn_linger="0.3s")
    async with running_manager(loaded) as mgr:
        results = await _agents(mgr, names, agents, rounds)
        assert [status for status, _ in results] == [200] * (agents * rounds)
        requests = agents * rounds
        # Each load serves the requests of every agent that wants that model (one swap
        # per round of the agents, not per request).
        assert starts(mgr) <= requests / 2 + 1, (starts(mgr), requests)
        longest_load = max(r.last_start_seconds or 0 for r in mgr.supervisor.runtimes)
        # No request waits for more than the other models' turns, each one batch long.
        bound = (count - 1) * (1.0 + 0.3 + longest_load + 1.0) + longest_load + 2.0
        assert max(seconds for _, seconds in results) < bound
        await mgr.post("/api/models/stop-all")


async def test_holder_busy_beyond_queue_timeout(tmp_path: Path, spawn_log: Path) -> None:
    models = {
        "a": on_gpu(spawn_log, 6000, "--chunks", "20", "--chunk-delay", "0.1"),
        "b": on_gpu(spawn_log, queue_timeout="1s", turn_time="5s"),
    }
    async with running_manager(make_config(tmp_path, models, devices=GPU)) as mgr:
        a, b = mgr.supervisor.resolve("a"), mgr.supervisor.resolve("b")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.admitted == 1)
        began = time.monotonic()
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=chat("b")) as resp:
            body = await resp.json()
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
        assert 0.9 < time.monotonic() - began < 2.5
        assert body["error"]["type"] == "model_busy"
        assert "waited 1 s (queue_timeout)" in body["error"]["message"]
        assert "held by: a" in body["error"]["message"]
        assert b.state is State.STOPPED and b.failure_reason is None  # not broken
        status, text = await streaming  # the holder's request is untouched
        assert status == 200 and text.count('"content": "tok') == 20 and text.endswith("[DONE]\n\n")
        assert a.state is State.ROUTING and a.turn_ends is None  # its door is open again
        await mgr.post("/api/models/stop-all")


async def test_a_waiting_client_that_leaves_starts_and_evicts_nothing(
    tmp_path: Path, spawn_log: Path
) -> None:
    b_spawns = tmp_path / "b-spawns.log"
    models = {
        "a": slow_streamer(spawn_log),
        "b": on_gpu(b_spawns),
    }
    async with running_manager(make_config(tmp_path, models, devices=GPU)) as mgr:
        a, b = mgr.supervisor.resolve("a"), mgr.supervisor.resolve("b")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.admitted == 1)
        with pytest.raises(asyncio.TimeoutError):
            timeout = aiohttp.ClientTimeout(total=0.4)
            async with mgr.http.post(
                mgr.url + "/v1/chat/completions", json=chat("b"), timeout=timeout
            ) as resp:
                await resp.read()
        await wait_until(lambda: b.state is State.STOPPED and b.pending == 0)
        assert any("start abandoned" in x.message for x in b.log.lines())
        assert (await streaming)[0] == 200
        await asyncio.sleep(1.0)  # past the linger: nothing comes to evict it
        assert a.state is State.ROUTING and a.turn_ends is None
        assert read_pids(b_spawns) == []  # b was never started
        await mgr.post("/api/models/stop-all")


async def test_pinned_model_is_never_evicted_nor_unloaded(tmp_path: Path, spawn_log: Path) -> None:
    models = {"p": on_gpu(spawn_log, pinned=True, idle_timeout="0.2s"), "b": on_gpu(spawn_log)}
    async with running_manager(make_config(tmp_path, models, devices=GPU)) as mgr:
        assert (await mgr.post("/api/models/p/start"))[0] == 200
        await asyncio.sleep(0.8)  # well past its idle_timeout
        p = mgr.supervisor.resolve("p")
        assert p.state is State.ROUTING
        status, body = await mgr.post("/v1/chat/completions", json=chat("b"))
        assert status == 503 and body["error"]["type"] == "device_unavailable"  # at once
        assert p.state is State.ROUTING
        _, info = await mgr.get("/api/models/p/info")
        assert info["model"]["pinned"] is True
        await mgr.post("/api/models/stop-all")


async def test_lower_priority_is_evicted_first(tmp_path: Path, spawn_log: Path) -> None:
    gpu = [{"name": "test gpu", "kind": "cuda", "memory_total_mib": 9000}]
    models = {
        "low": on_gpu(spawn_log, 4000, priority=-1),
        "high": on_gpu(spawn_log, 4000, priority=5),
        "new": on_gpu(spawn_log, 4000),
    }
    async with running_manager(make_config(tmp_path, models, devices=gpu)) as mgr:
        assert (await mgr.post("/api/models/high/start"))[0] == 200
        assert (await mgr.post("/api/models/low/start"))[0] == 200  # the most recently used
        assert (await complete(mgr, "new"))[0] == 200
        states = {r.name: r.state for r in mgr.supervisor.runtimes}
        assert states == {"low": State.STOPPED, "high": State.ROUTING, "new": State.ROUTING}
        await mgr.post("/api/models/stop-all")


async def test_higher_priority_waiting_model_goes_first(tmp_path: Path, spawn_log: Path) -> None:
    models = {
        "a": on_gpu(spawn_log, 6000, "--chunks", "8", "--chunk-delay", "0.1"),
        "b": on_gpu(spawn_log, priority=0),
        "c": on_gpu(spawn_log, priority=5),
    }
    loaded = make_config(tmp_path, models, devices=GPU, turn_time="0.5s")
    async with running_manager(loaded) as mgr:
        a, b, c = (mgr.supervisor.resolve(n) for n in "abc")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.admitted == 1)
        for_b = asyncio.create_task(complete(mgr, "b"))
        await wait_until(lambda: b.waiting_for == ("a",))
        for_c = asyncio.create_task(complete(mgr, "c"))
        await wait_until(lambda: bool(c.waiting_for))
        assert (await streaming)[0] == 200
        assert (await for_b)[0] == 200 and (await for_c)[0] == 200
        # c arrived later but ranks higher: it got the memory first, then b took its turn.
        assert b.waiting_for == () and any("c" in x.message for x in b.log.lines())
        assert any("evicted to make room for c" in x.message for x in a.log.lines())
        assert any("evicted to make room for b" in x.message for x in c.log.lines())
        await mgr.post("/api/models/stop-all")


async def test_requests_for_a_model_that_fits_are_not_held_up(
    tmp_path: Path, spawn_log: Path
) -> None:
    gpu = [{"name": "test gpu", "kind": "cuda", "memory_total_mib": 10000}]
    models = {
        "a": on_gpu(spawn_log, 6000, "--chunks", "20", "--chunk-delay", "0.1"),
        "b": on_gpu(spawn_log, 6000),
        "small": on_gpu(spawn_log, 1000),
    }
    async with running_manager(make_config(tmp_path, models, devices=gpu)) as mgr:
        a, b = mgr.supervisor.resolve("a"), mgr.supervisor.resolve("b")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.admitted == 1)
        for_b = asyncio.create_task(complete(mgr, "b"))
        await wait_until(lambda: b.waiting_for == ("a",))
        status, seconds = await complete(mgr, "small")  # fits beside a: no wait
        assert status == 200 and not streaming.done()
        assert (await streaming)[0] == 200 and (await for_b)[0] == 200
        await mgr.post("/api/models/stop-all")


def _pinned_yaml(mib_a: int, mib_b: int) -> str:
    models = {
        name: {"pinned": True, "schemes": {"GPU": {"devices": {"gpu": mib}, "command": "x"}}}
        for name, mib in (("a", mib_a), ("b", mib_b))
    }
    return json.dumps({"devices": GPU, "models": models})


def test_pinned_models_that_cannot_fit_together_fail_the_config_check(tmp_path: Path) -> None:
    parse_text(_pinned_yaml(4000, 4000), "ok")  # 8000 of 8000 MiB: fits
    with pytest.raises(ConfigError) as caught:
        parse_text(_pinned_yaml(4000, 4001), "bad")
    (problem,) = caught.value.problems
    assert problem.path == "models.b.pinned"
    assert "pinned models (a, b) can never be loaded together" in problem.message
    assert "needs 4001 MiB, 4000 MiB free" in problem.message
    path = tmp_path / "pinned.yaml"
    path.write_text(_pinned_yaml(6000, 6000))
    result = CliRunner().invoke(cli, ["check-config", str(path)])
    assert result.exit_code == 1
    assert "can never be loaded together" in result.output


async def test_real_llama_cpp_models_take_turns(tmp_path: Path, tiny_models: Any) -> None:
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    openai = pytest.importorskip("openai")
    from tests.test_gateway_llama import engine

    def llama(name: str) -> dict[str, Any]:
        scheme = {"devices": {"gpu": 6000}, "command": engine(tiny_models.chat)}
        return {"schemes": {"GPU": scheme}}

    names = ["architect", "editor"]
    loaded = make_config(
        tmp_path, {n: llama(n) for n in names}, devices=GPU, turn_time="2s", turn_linger="0.3s"
    )
    async with running_manager(loaded) as mgr:
        ai = openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="none", max_retries=0)

        async def agent(i: int) -> list[str]:
            answers = []
            for r in range(6):
                answer = await ai.chat.completions.create(
                    model=names[(i + r) % 2],
                    messages=[{"role": "user", "content": f"agent {i} step {r}"}],
                    max_tokens=4,
                    temperature=0,
                )
                answers.append(answer.model)
            return answers

        try:
            served = await asyncio.gather(agent(0), agent(1))
        finally:
            await ai.close()
        assert [len(a) for a in served] == [6, 6]  # every request answered, none failed
        loads = starts(mgr)
        print(f"real llama.cpp, 2 agents x 6 alternating requests: {loads} model starts")
        assert 2 <= loads <= 8, loads  # 12 requests; about one load per round of the agents
        await mgr.post("/api/models/stop-all")


async def test_streamed_request_is_kept_alive_while_it_waits(
    tmp_path: Path, spawn_log: Path
) -> None:
    openai = pytest.importorskip("openai")
    models = {
        "a": slow_streamer(spawn_log),
        "b": on_gpu(spawn_log, 6000, "--chunks", "3"),
        "c": on_gpu(spawn_log, 6000, queue_timeout="0.5s"),
    }
    loaded = make_config(tmp_path, models, devices=GPU, stream_keepalive="0.1s")
    async with running_manager(loaded) as mgr:
        a = mgr.supervisor.resolve("a")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.admitted == 1)
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=chat("b", True)) as resp:
            assert resp.status == 200  # committed before b could start
            first = await resp.content.readline()
            assert first == b": waiting for model b\n"
            text = (first + await resp.read()).decode()
        assert text.count('"content": "tok') == 3 and text.endswith("data: [DONE]\n\n")
        assert (await streaming)[0] == 200

        # A start that then fails reaches the client as an error event, which the
        # official client raises.
        ai = openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="none", max_retries=0)
        try:
            b = mgr.supervisor.resolve("b")
            assert b.state is State.ROUTING and b.try_admit()  # busy past c's queue_timeout
            with pytest.raises(openai.APIError, match="queue_timeout"):
                chunks = await ai.chat.completions.create(
                    model="c", messages=[{"role": "user", "content": "hi"}], stream=True
                )
                async for _ in chunks:
                    pass
            b.dismiss()
        finally:
            await ai.close()
        await mgr.post("/api/models/stop-all")


async def test_pinned_models_too_big_for_probed_memory_are_warned_about_at_start(
    tmp_path: Path, spawn_log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    command = fake_command("--spawn-log", str(spawn_log))
    huge = {"pinned": True, "schemes": {"CPU": {"devices": {"cpu": 10**9}, "command": command}}}
    async with running_manager(make_config(tmp_path, {"huge": huge})):
        await wait_until(lambda: "can never be loaded together" in caplog.text)
    assert "on this machine's devices: model 'huge', scheme 'CPU'" in caplog.text


async def test_a_wait_for_room_does_not_count_against_startup_timeout(
    tmp_path: Path, spawn_log: Path
) -> None:
    # The load (a Python start and 0.5 s) fits startup_timeout with room to spare on a busy
    # machine; the wait for a's stream (about 3 s) and the load together do not.
    models = {
        "a": on_gpu(spawn_log, 6000, "--chunks", "30", "--chunk-delay", "0.1"),
        "b": on_gpu(spawn_log, 6000, "--slow-start", "0.5"),
    }
    loaded = make_config(tmp_path, models, devices=GPU, startup_timeout="2s")
    async with running_manager(loaded) as mgr:
        a, b = mgr.supervisor.resolve("a"), mgr.supervisor.resolve("b")
        streaming = asyncio.create_task(stream_text(mgr, "a"))
        await wait_until(lambda: a.admitted == 1)
        status, seconds = await complete(mgr, "b")  # waits ~3 s for a, then loads ~1 s
        assert status == 200 and seconds > 2.0
        assert b.start_count == 1 and b.last_start_seconds is not None
        assert b.last_start_seconds < 2.0  # the load alone, not the wait
        assert (await streaming)[0] == 200
        await mgr.post("/api/models/stop-all")
