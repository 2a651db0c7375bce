"""The manager's cluster paths (planner, runtime, failover) against a fake cluster, no Ray:
its nodes are named reports, and its engine hosts are real EngineHosts run in this process
(so the engines are real processes on this machine, reached at 127.0.0.1)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_manager import app as app_module
from llm_manager.cluster.nodes import NodeInfo
from llm_manager.cluster.remote import HostLost, RemoteEngine
from llm_manager.config import LoadedConfig, parse_text
from llm_manager.devices.base import Device, ProviderReport
from llm_manager.errors import StartFailed
from llm_manager.models.footprint import read_usages
from tests.conftest import fake_command, running_manager
from tests.test_cluster_units import InProcess


def gpu(mib: int) -> ProviderReport:
    return ProviderReport("cuda", True, (Device("cuda:0", "cuda", "GPU", mib, 0, mib, index=0),))


class Losable(InProcess):
    """An in-process host whose node can be "removed": its engine ends, its wait says lost."""

    def __init__(self) -> None:
        super().__init__()
        self.gone = asyncio.Event()

    async def wait(self) -> int:
        done = asyncio.ensure_future(self.host.wait())
        lost = asyncio.ensure_future(self.gone.wait())
        await asyncio.wait({done, lost}, return_when=asyncio.FIRST_COMPLETED)
        if lost.done():
            done.cancel()
            await self.host.stop(0)  # what the node's reaper does when the node dies
            raise HostLost("the node died")
        lost.cancel()
        return done.result()


class FakeCluster:
    def __init__(self) -> None:
        self.answers = {
            "a": (NodeInfo("a", "id-a", "127.0.0.1", {"zone": "x"}), [gpu(24000)]),
            "b": (NodeInfo("b", "id-b", "127.0.0.1", {"zone": "y"}), [gpu(48000)]),
        }
        self.hosts: dict[str, list[Losable]] = {"a": [], "b": []}

    def nodes(self) -> list[NodeInfo]:
        return [node for node, _ in self.answers.values()]

    def probe(self) -> list[tuple[NodeInfo, list[ProviderReport]]]:
        return list(self.answers.values())

    async def host(self, node: str, model: str) -> RemoteEngine:
        if node not in self.answers:
            raise StartFailed(f"node {node} is not in the cluster any more")
        calls = Losable()
        self.hosts[node].append(calls)
        return RemoteEngine(node, "127.0.0.1", calls)

    def remove(self, node: str) -> None:
        del self.answers[node]
        for calls in self.hosts[node]:
            calls.gone.set()

    def usages(self, node: str, pids: dict[str, int]) -> dict[str, dict[str, int]]:
        return read_usages(pids, [])  # the "node" is this machine

    def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    fake = FakeCluster()

    async def join(config: Any) -> FakeCluster | None:
        return fake if config is not None else None

    monkeypatch.setattr(app_module, "join_cluster", join)
    return fake


def config(tmp_path: Path, models: dict[str, Any]) -> LoadedConfig:
    data = {
        "server": {"data_dir": str(tmp_path / "data"), "stop_timeout": "2s"},
        "cluster": {"address": "fake:6379"},
        "models": models,
    }
    return LoadedConfig(parse_text(yaml.safe_dump(data, sort_keys=False), "test"), "test", tmp_path)


def model(mib: int, nodes: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    scheme: dict[str, Any] = {"devices": {"cuda:0": mib}, "command": fake_command()}
    if nodes:
        scheme["nodes"] = nodes
    return {"schemes": {"gpu": scheme}, **extra}


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_placement_by_mib_labels_and_refusal(tmp_path: Path, cluster: FakeCluster) -> None:
    models = {
        "big": model(30000),  # only b's GPU has room
        "zoned": model(1000, {"zone": "x"}),  # a, though b has more room
        "huge": model(60000),
        "nowhere": model(1000, {"zone": "z"}),
    }
    async with running_manager(config(tmp_path, models)) as manager:
        assert (await manager.post("/v1/chat/completions", json={"model": "big", **CHAT}))[0] == 200
        assert (await manager.post("/v1/chat/completions", json={"model": "zoned", **CHAT}))[
            0
        ] == 200
        sup = manager.supervisor
        assert (sup.resolve("big").node, sup.resolve("zoned").node) == ("b", "a")
        assert sup.booked("big") == {"cuda:0": 30000}
        assert sup.placed_on("big") == {"cuda:0": "b/cuda:0"}
        assert "CUDA_VISIBLE_DEVICES=0" in "\n".join(
            line.message for line in sup.resolve("big").log.lines_after(0)
        )
        status, body = await manager.post("/v1/chat/completions", json={"model": "huge", **CHAT})
        assert status == 503 and "60000 MiB" in body["error"]["message"] + str(body)
        status, body = await manager.post("/v1/chat/completions", json={"model": "nowhere", **CHAT})
        assert status == 503 and "a node with zone=z" in str(body)
        _, info = await manager.get("/api/models/big/info")
        assert info["model"]["node"] == "b"
        # Its memory is measured on its node: system memory under the plain host key.
        deadline = time.monotonic() + 10
        while not sup.footprints.current("big").get("cpu"):
            assert time.monotonic() < deadline, sup.footprints.current("big")
            await asyncio.sleep(0.1)


async def test_a_lost_node_fails_its_model_and_auto_start_places_it_again(
    tmp_path: Path, cluster: FakeCluster
) -> None:
    async with running_manager(config(tmp_path, {"m": model(10000, auto_start=True)})) as manager:
        runtime = manager.supervisor.resolve("m")
        deadline = time.monotonic() + 15
        while runtime.state.value != "routing":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert runtime.node == "b"
        cluster.remove("b")
        deadline = time.monotonic() + 15
        while not (runtime.state.value == "routing" and runtime.node == "a"):
            assert time.monotonic() < deadline, runtime.state
            await asyncio.sleep(0.02)
        log = "\n".join(line.message for line in runtime.log.lines_after(0))
        assert "its node b left the cluster (the node died)" in log
        assert runtime.node_losses == 1
        assert manager.supervisor.booked("m") == {"cuda:0": 10000}
        assert manager.supervisor.placed_on("m") == {"cuda:0": "a/cuda:0"}
        status, _ = await manager.post("/v1/chat/completions", json={"model": "m", **CHAT})
        assert status == 200
        assert all(calls.host._proc is not None for calls in cluster.hosts["b"])
        assert all(calls.host._proc.returncode is not None for calls in cluster.hosts["b"])
