"""Cluster mode on a real local multi-node Ray cluster (ray.cluster_utils.Cluster): a head
and two worker nodes with declared (fake) GPUs, the fake model server and real processes.

One cluster for the module (starting one takes seconds); the test that removes a node
runs last and adds it back.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from llm_manager.config import LoadedConfig, parse_text
from tests.conftest import alive, fake_command, read_pids, running_manager, wait_until

ray = pytest.importorskip("ray", reason="cluster mode needs the cluster extra (ray)")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.timeout(180)

GPU_W1 = [
    {"name": f"Fake GPU A{i}", "kind": "cuda", "index": i, "memory_total_mib": 24000}
    for i in (0, 1)
]
GPU_W2 = [{"name": "Fake GPU B", "kind": "cuda", "index": 0, "memory_total_mib": 48000}]


def _worker(cluster: Cluster, name: str, zone: str, gpus: list[dict[str, Any]]) -> Any:
    return cluster.add_node(
        num_cpus=1,
        num_gpus=len(gpus),
        labels={"llm-manager/node": name, "zone": zone},
        env_vars={"LLM_MANAGER_NODE_DEVICES": json.dumps(gpus)},
    )


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, Any]]:
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "labels": {"llm-manager/node": "head"},
            # A node that stops answering is known dead in about a second (14 s by default).
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2},
        },
    )
    nodes = {"w1": _worker(cluster, "w1", "a", GPU_W1), "w2": _worker(cluster, "w2", "b", GPU_W2)}
    cluster.wait_for_nodes()
    state = {"cluster": cluster, "nodes": nodes}
    try:
        yield state
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


def _data(
    tmp_path: Path, ray_cluster: dict[str, Any], models: dict[str, Any], **server: Any
) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(tmp_path / "data"), "stop_timeout": "2s", **server},
        "models": models,
        # A namespace per test: actor names never meet an earlier test's.
        "cluster": {
            "address": ray_cluster["cluster"].address,
            "namespace": f"t{time.monotonic_ns()}",
        },
    }


def _config(
    tmp_path: Path, ray_cluster: dict[str, Any], models: dict[str, Any], **server: Any
) -> LoadedConfig:
    text = yaml.safe_dump(_data(tmp_path, ray_cluster, models, **server), sort_keys=False)
    return LoadedConfig(parse_text(text, "test"), "test", tmp_path)


def _model(mib: int, *switches: str, key: str = "cuda:0", **extra: Any) -> dict[str, Any]:
    nodes = extra.pop("nodes", None)
    scheme: dict[str, Any] = {
        "devices": {key: mib},
        "command": fake_command("--host", "{host}", *switches),
    }
    if nodes:
        scheme["nodes"] = nodes
    return {"schemes": {"gpu": scheme}, **extra}


def _log_text(runtime: Any) -> str:
    return "\n".join(line.message for line in runtime.log.lines_after(0))


async def _chat(manager: Any, model: str) -> tuple[int, Any]:
    return await manager.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
    )


async def _info(manager: Any, model: str) -> dict[str, Any]:
    _, body = await manager.get(f"/api/models/{model}/info")
    return body["model"]


async def test_placed_by_mib_on_the_node_that_fits(
    tmp_path: Path, ray_cluster: dict[str, Any]
) -> None:
    # 30000 MiB on one GPU: only w2's 48000 MiB GPU has room (w1's are 24000 each).
    loaded = _config(tmp_path, ray_cluster, {"big": _model(30000)})
    async with running_manager(loaded) as manager:
        status, body = await _chat(manager, "big")
        assert status == 200, body
        runtime = manager.supervisor.resolve("big")
        assert runtime.node == "w2"
        assert runtime.host == ray_cluster["cluster"].address.split(":")[0]
        info = await _info(manager, "big")
        assert info["node"] == "w2" and info["status"] == "routing"
        # Its memory is read by w2's agent, there (the engine's process tree).
        deadline = time.monotonic() + 15
        while not manager.supervisor.footprints.current("big").get("cpu"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert "on node w2" in _log_text(runtime)
        # As the planner decided, from the engine itself (its output comes from the node a
        # moment after it is ready).
        await wait_until(lambda: "CUDA_VISIBLE_DEVICES=0" in _log_text(runtime))
        status, devices = await manager.get("/api/devices/info")
        assert status == 200
        cluster_view = devices["devices"]["cluster"]
        names = {n["name"] for n in cluster_view["nodes"]}
        assert {"head", "w1", "w2"} <= names
        _, health = await manager.get("/health")
        assert {"head", "w1", "w2"} <= set(health["cluster"]["nodes"])
        by_key = {d["key"]: d for d in cluster_view["info"]["devices"]}
        assert by_key["w2/static:Fake GPU B"]["node"] == "w2"
        assert by_key["w2/static:Fake GPU B"]["memory_total"] == 48000
        assert by_key["w1/cpu"]["node"] == "w1"


async def test_a_model_no_node_fits_is_refused_at_once(
    tmp_path: Path, ray_cluster: dict[str, Any]
) -> None:
    loaded = _config(tmp_path, ray_cluster, {"huge": _model(100000)})
    async with running_manager(loaded) as manager:
        began = time.monotonic()
        status, body = await _chat(manager, "huge")
        assert status == 503, body
        assert time.monotonic() - began < 10
        assert "100000 MiB" in json.dumps(body)
        assert manager.supervisor.resolve("huge").state.value == "stopped"


async def test_node_labels_choose_the_node(
    tmp_path: Path, ray_cluster: dict[str, Any], spawn_log: Path
) -> None:
    # w2 has the most free memory, but the scheme asks for zone a: w1, its two GPUs.
    model = _model(10000, "--spawn-log", str(spawn_log), nodes={"zone": "a"})
    model["schemes"]["gpu"]["devices"] = {"cuda:0": 10000, "cuda:1": 10000}
    loaded = _config(tmp_path, ray_cluster, {"zoned": model})
    async with running_manager(loaded) as manager:
        status, body = await _chat(manager, "zoned")
        assert status == 200, body
        runtime = manager.supervisor.resolve("zoned")
        assert runtime.node == "w1"
        # The engine's own output comes from the node a moment after it is ready.
        await wait_until(lambda: "CUDA_VISIBLE_DEVICES=0,1" in _log_text(runtime))


async def test_stop_and_idle_unload_leave_no_process(
    tmp_path: Path, ray_cluster: dict[str, Any], spawn_log: Path
) -> None:
    models = {
        "kept": _model(1000, "--spawn-log", str(spawn_log), "--fork-grandchild"),
        "idle": _model(1000, "--spawn-log", str(spawn_log), "--fork-grandchild", idle_timeout="1s"),
    }
    loaded = _config(tmp_path, ray_cluster, models)
    async with running_manager(loaded) as manager:
        for name in models:
            status, body = await _chat(manager, name)
            assert status == 200, body
        pids = read_pids(spawn_log) + read_pids(spawn_log.with_name(spawn_log.name + ".grandchild"))
        assert len(pids) == 4 and all(alive(p) for p in pids)
        idle = manager.supervisor.resolve("idle")
        deadline = time.monotonic() + 15
        while idle.state.value != "stopped" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert idle.state.value == "stopped"
        status, body = await manager.post("/api/models/kept/stop")
        assert status == 200, body
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [p for p in pids if alive(p)]


async def test_eviction_on_one_node(tmp_path: Path, ray_cluster: dict[str, Any]) -> None:
    # Both need 30000 MiB on one GPU: only w2 has it; the second start evicts the first.
    loaded = _config(tmp_path, ray_cluster, {"one": _model(30000), "two": _model(30000)})
    async with running_manager(loaded) as manager:
        status, _ = await _chat(manager, "one")
        assert status == 200
        status, body = await _chat(manager, "two")
        assert status == 200, body
        assert manager.supervisor.resolve("two").node == "w2"
        assert manager.supervisor.resolve("one").state.value == "stopped"


async def test_real_llama_cpp_on_a_node_behind_its_own_key(
    tmp_path: Path, ray_cluster: dict[str, Any], tiny_models: Any
) -> None:
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    import openai

    command = [
        "llm-manager", "llama-server", "-m", str(tiny_models.chat), "--host", "{host}",
        "--port", "{port}", "-a", "{name}", "-t", "1", "-c", "512", "--api-key", "{api_key}",
    ]  # fmt: skip
    models = {
        "tiny": {
            "schemes": {
                "cpu": {"devices": {"cpu": 500}, "command": command, "nodes": {"node": "w1"}}
            }
        }
    }
    loaded = _config(tmp_path, ray_cluster, models)
    async with running_manager(loaded) as manager:
        client = openai.AsyncOpenAI(base_url=manager.url + "/v1", api_key="the-clients-own")
        answer = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content is not None
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=8,
                stream=True,
            )
        ]
        assert chunks
        runtime = manager.supervisor.resolve("tiny")
        assert runtime.node == "w1"
        # The engine listens on the node's address and answers nobody without its key.
        async with manager.http.get(f"{runtime.base_url}/v1/models") as resp:
            assert resp.status == 401
        assert "llama" in _log_text(runtime).lower()  # llama.cpp's own lines, from the node
        await client.close()


async def test_turns_on_one_node(tmp_path: Path, ray_cluster: dict[str, Any]) -> None:
    # Both need w2's only GPU: the second waits for the first's answer, then takes the room.
    slow = _model(30000, "--chunks", "10", "--chunk-delay", "0.1", nodes={"node": "w2"})
    loaded = _config(
        tmp_path, ray_cluster, {"first": slow, "second": _model(30000)}, turn_time="0.2s"
    )
    async with running_manager(loaded) as manager:
        status, _ = await _chat(manager, "first")
        assert status == 200
        payload = {"model": "first", "stream": True, "messages": [{"role": "user", "content": "x"}]}

        async def stream() -> bytes:
            async with manager.http.post(
                manager.url + "/v1/chat/completions", json=payload
            ) as resp:
                return await resp.read()

        busy = asyncio.create_task(stream())
        await asyncio.sleep(0.2)
        status, body = await _chat(manager, "second")
        assert status == 200, body
        assert b"[DONE]" in await busy  # the first finished its answer before it went
        assert manager.supervisor.resolve("second").node == "w2"
        assert manager.supervisor.resolve("first").state.value == "stopped"


async def test_a_killed_manager_leaves_no_engine(
    tmp_path: Path, ray_cluster: dict[str, Any], spawn_log: Path
) -> None:
    import signal
    import subprocess
    import sys

    model = _model(1000, "--spawn-log", str(spawn_log), "--fork-grandchild", auto_start=True)
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(_data(tmp_path, ray_cluster, {"orphan": model}), sort_keys=False)
    )
    with (tmp_path / "serve.log").open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_manager", "serve", "--config", str(path), "--port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        grandchild = spawn_log.with_name(spawn_log.name + ".grandchild")
        deadline = time.monotonic() + 60
        while not read_pids(grandchild) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        pids = read_pids(spawn_log) + read_pids(grandchild)
        assert len(pids) == 2 and all(alive(p) for p in pids), (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    import psutil

    left = []
    for p in pids:
        if alive(p):
            proc_ = psutil.Process(p)
            left.append(
                (p, proc_.cmdline()[:3], [(q.pid, q.cmdline()[:4]) for q in proc_.parents()][:3])
            )
    assert not left, f"the engine outlived its manager: {left} (engine {read_pids(spawn_log)})"


async def test_llm_manager_node_joins_a_machine(
    tmp_path: Path, ray_cluster: dict[str, Any], spawn_log: Path
) -> None:
    import signal
    import subprocess
    import sys

    argv = [
        sys.executable, "-m", "llm_manager", "node", "--address", ray_cluster["cluster"].address,
        "--name", "w3", "--label", "zone=c", "--device", "Fake C:16000", "--block",
        "--", "--num-cpus", "1", "--object-store-memory", "100000000",
    ]  # fmt: skip
    with (tmp_path / "node.log").open("w") as out:
        # Ray drains a node for up to 30 s at SIGTERM; 2 s is enough here.
        env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2")
        node = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        model = _model(12000, "--spawn-log", str(spawn_log), nodes={"zone": "c"})
        loaded = _config(tmp_path, ray_cluster, {"on-w3": model})
        async with running_manager(loaded) as manager:
            deadline = time.monotonic() + 60
            while "w3" not in {
                n.name for n, _ in await asyncio.to_thread(manager.app.cluster.probe)
            }:
                assert node.poll() is None, (tmp_path / "node.log").read_text()
                assert time.monotonic() < deadline, "the node did not join"
                await asyncio.sleep(0.5)
            status, body = await _chat(manager, "on-w3")
            assert status == 200, body
            runtime = manager.supervisor.resolve("on-w3")
            assert runtime.node == "w3"
            # The engine's own output comes from the node a moment after it is ready.
            await wait_until(lambda: "CUDA_VISIBLE_DEVICES=0" in _log_text(runtime))
            _, devices = await manager.get("/api/devices/info")
            nodes = {n["name"]: n for n in devices["devices"]["cluster"]["nodes"]}
            assert nodes["w3"]["labels"]["llm-manager/gpus"] == "1"
            assert nodes["w3"]["labels"]["llm-manager/gpu-mib"] == "16000"
            engine = read_pids(spawn_log)[0]
            # SIGTERM to the command stops the node (it is ray start itself, not its parent).
            node.send_signal(signal.SIGTERM)
            node.wait(30)
            deadline = time.monotonic() + 20
            while runtime.state.value == "routing":
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert "w3 left the cluster" in _log_text(runtime)
            status, body = await _chat(manager, "on-w3")
            assert status == 503, body  # no other node carries zone=c
        assert not alive(engine)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()


async def test_a_cluster_with_token_authentication(
    tmp_path: Path, ray_cluster: dict[str, Any], spawn_log: Path
) -> None:
    """llm-manager node --head --token-file starts a cluster that only token holders join:
    a manager with cluster.auth_token_file runs its model there, one without is refused."""
    import signal
    import socket
    import subprocess
    import sys

    host = ray_cluster["cluster"].address.split(":")[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    token = tmp_path / "token"
    token.write_text("a-cluster-token-0123456789abcdef0123456789\n")
    env = dict(os.environ, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="2")
    head_argv = [
        sys.executable, "-m", "llm_manager", "node", "--head", "--port", str(port), "--name", "secure",
        "--token-file", str(token), "--block",
        "--", "--num-cpus", "1", "--object-store-memory", "100000000", "--include-dashboard", "false",
    ]  # fmt: skip
    with (tmp_path / "head.log").open("w") as out:
        head = subprocess.Popen(head_argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    managers: list[subprocess.Popen[bytes]] = []

    def serve(name: str, cluster: dict[str, Any]) -> subprocess.Popen[bytes]:
        data = _data(
            tmp_path / name,
            ray_cluster,
            {"m": _model(0, "--spawn-log", str(spawn_log), key="cpu", auto_start=True)},
        )
        data["cluster"] = cluster
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        with (tmp_path / f"{name}.log").open("w") as errors:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llm_manager",
                    "serve",
                    "--config",
                    str(path),
                    "--port",
                    "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=errors,
                env=env,
            )
        managers.append(proc)
        return proc

    try:
        address = f"{host}:{port}"
        serve("holder", {"address": address, "auth_token_file": str(token)})
        deadline = time.monotonic() + 90
        while not read_pids(spawn_log):
            assert head.poll() is None, (tmp_path / "head.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "holder.log").read_text()
            await asyncio.sleep(0.2)
        assert "on node secure" in (tmp_path / "holder.log").read_text()
        stranger = serve("stranger", {"address": address, "connect_timeout": "5s"})
        code = await asyncio.to_thread(stranger.wait, 60)
        said = (tmp_path / "stranger.log").read_text()
        assert code == 1, said
        assert "cannot serve:" in said and address in said
    finally:
        for proc in [*managers, head]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*managers, head]:
            try:
                await asyncio.to_thread(proc.wait, 40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_a_removed_node_fails_over(
    tmp_path: Path, ray_cluster: dict[str, Any], spawn_log: Path
) -> None:
    # 10000 MiB fits either worker; w2 (most free) is chosen, then removed mid-answer.
    model = _model(
        10000,
        "--spawn-log",
        str(spawn_log),
        "--chunks",
        "50",
        "--chunk-delay",
        "0.1",
        auto_start=True,
    )
    loaded = _config(tmp_path, ray_cluster, {"moving": model})
    cluster = ray_cluster["cluster"]
    async with running_manager(loaded) as manager:
        status, body = await _chat(manager, "moving")
        assert status == 200, body
        runtime = manager.supervisor.resolve("moving")
        assert runtime.node == "w2"
        first_pid = read_pids(spawn_log)[0]

        async def stream() -> tuple[int, bytes]:
            payload = {
                "model": "moving",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            }
            async with manager.http.post(
                manager.url + "/v1/chat/completions", json=payload
            ) as resp:
                got = b""
                try:
                    async for chunk in resp.content.iter_any():
                        got += chunk
                except aiohttp.ClientPayloadError:
                    got += b"<cut>"
                return resp.status, got

        inflight = asyncio.create_task(stream())
        await asyncio.sleep(0.8)
        removed_at = time.monotonic()
        cluster.remove_node(ray_cluster["nodes"].pop("w2"))
        status, got = await asyncio.wait_for(inflight, 30)
        assert status == 200  # the answer had begun: it ends early, and says so
        assert b"[DONE]" not in got
        deadline = time.monotonic() + 15
        while runtime.state.value == "routing" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert runtime.state.value != "routing" or runtime.node == "w1"
        assert "w2 left the cluster" in _log_text(runtime)
        assert runtime.node_losses == 1
        # auto_start: placed again on w1 without a request.
        deadline = time.monotonic() + 20
        while not (runtime.state.value == "routing" and runtime.node == "w1"):
            assert time.monotonic() < deadline, runtime.state
            await asyncio.sleep(0.05)
        back = time.monotonic() - removed_at
        status, body = await _chat(manager, "moving")
        assert status == 200, body
        served_again = time.monotonic() - removed_at
        async with manager.http.get(manager.url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'llm_manager_model_node_losses{model="moving"} 1.0' in metrics
        assert 'llm_manager_model_node{model="moving",node="w1"} 1.0' in metrics
        assert served_again < 20, served_again
        print(f"running again on w1 {back:.1f} s, served {served_again:.1f} s after w2 was removed")
    assert not alive(first_pid)
    ray_cluster["nodes"]["w2"] = _worker(cluster, "w2", "b", GPU_W2)
