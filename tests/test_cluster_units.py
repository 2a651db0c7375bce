"""Cluster mode without Ray: placement across nodes, the node side of an engine (real
processes, driven in-process), the manager's side against a fake host, the node command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from llm_manager.cli import node as joining
from llm_manager.cli.main import cli
from llm_manager.cluster import ray_backend
from llm_manager.cluster.actors import EngineHost, NodeAgent, engine_env
from llm_manager.cluster.nodes import NodeInfo, qualify
from llm_manager.cluster.remote import LOST_CODE, HostLost, RemoteEngine
from llm_manager.config import ClusterConfig, ConfigError, SchemeConfig, parse_text
from llm_manager.devices.base import Device, ProviderReport
from llm_manager.devices.cluster import ClusterProvider
from llm_manager.errors import StartFailed
from llm_manager.models import launch, scheduler
from tests.conftest import alive, fake_command, read_pids, wait_until


def gpu(node: str, index: int, free: int, total: int = 24000) -> Device:
    return Device(
        key=f"{node}/cuda:{index}",
        kind="cuda",
        name="GPU",
        memory_total=total,
        memory_used=total - free,
        memory_free=free,
        index=index,
        node=node,
    )


# --- placement across nodes (scheduler) -------------------------------------------------


def test_a_scheme_fits_on_the_node_with_the_most_room() -> None:
    devices = [gpu("a", 0, 9000), gpu("b", 0, 20000), gpu("c", 0, 12000)]
    fit = scheduler.fit_scheme("s", {"cuda:0": 8000}, devices)
    assert isinstance(fit, scheduler.Fit)
    assert fit.node == "b" and fit.assignment == {"cuda:0": "b/cuda:0"}
    assert fit.gpu_indices(devices) == [0]


def test_a_scheme_never_spans_two_nodes() -> None:
    # Two GPUs in the cluster, but one per node: a two-GPU scheme does not fit.
    devices = [gpu("a", 0, 20000), gpu("b", 1, 20000)]
    result = scheduler.fit_scheme("s", {"cuda:0": 1000, "cuda:1": 1000}, devices)
    assert isinstance(result, scheduler.Shortfall)
    assert result.missing
    devices.append(gpu("b", 0, 20000))
    fit = scheduler.fit_scheme("s", {"cuda:0": 1000, "cuda:1": 1000}, devices)
    assert isinstance(fit, scheduler.Fit) and fit.node == "b"


def test_the_closest_miss_is_reported_when_no_node_fits() -> None:
    devices = [gpu("a", 0, 5000), gpu("b", 0, 15000)]
    result = scheduler.fit_scheme("s", {"cuda:0": 20000}, devices)
    assert isinstance(result, scheduler.Shortfall)
    assert (result.free, result.missing) == (15000, False)


def test_eviction_is_planned_on_one_node() -> None:
    devices = [gpu("a", 0, 1000), gpu("b", 0, 1000), gpu("b", 1, 1000)]
    holders = [
        scheduler.Holder("x", 1.0, (scheduler.Claim("x", "a/cuda:0", 20000),), priority=1),
        scheduler.Holder("y", 2.0, (scheduler.Claim("y", "b/cuda:0", 15000),)),
    ]
    # y is cheaper and frees enough on b.
    assert scheduler.plan_eviction("s", {"cuda:0": 16000}, devices, holders) == ["y"]
    # y frees too little; x frees enough on a, and y is not stopped for nothing.
    assert scheduler.plan_eviction("s", {"cuda:0": 17000}, devices, holders) == ["x"]
    # Two GPUs of 16000 on one node: a's single GPU never counts with b's second.
    assert (
        scheduler.plan_eviction("s", {"cuda:0": 16000, "cuda:1": 16000}, devices, holders) is None
    )


def test_cpu_key_matches_every_nodes_system_memory() -> None:
    cpu = Device("a/cpu", "cpu", "cpu", 64000, 1000, 63000, node="a")
    assert scheduler.matches("cpu", cpu)


def test_node_labels() -> None:
    node = NodeInfo("gpu-1", "id", "10.0.0.5", {"zone": "a"})
    assert node.carries({})
    assert node.carries({"zone": "a", "node": "gpu-1"})
    assert not node.carries({"zone": "b"})
    assert not node.carries({"node": "gpu-2"})


# --- the cluster's devices ----------------------------------------------------------------


class FakeCluster:
    def __init__(self, answers: list[tuple[NodeInfo, list[ProviderReport]]]) -> None:
        self.answers = answers

    def nodes(self) -> list[NodeInfo]:
        return [n for n, _ in self.answers]

    def probe(self) -> list[tuple[NodeInfo, list[ProviderReport]]]:
        return self.answers

    async def host(self, node: str, model: str) -> RemoteEngine:
        raise StartFailed("no hosts in this fake")

    def close(self) -> None:
        pass


def test_the_cluster_provider_names_every_device_by_its_node() -> None:
    local = Device("cuda:0", "cuda", "H100", 81000, 1000, 80000, index=0)
    a = NodeInfo("a", "id-a", "10.0.0.1", {"zone": "x"})
    b = NodeInfo("b", "id-b", "10.0.0.2")
    offline = ProviderReport("cuda", online=False, reason="no NVML")
    report = ClusterProvider(
        FakeCluster([(a, [ProviderReport("cuda", True, (local,))]), (b, [offline])])
    ).probe()
    assert report.online
    assert [(d.key, d.node, d.memory_free) for d in report.devices] == [("a/cuda:0", "a", 80000)]
    nodes = {n["name"]: n for n in report.info["nodes"]}
    assert nodes["a"]["labels"] == {"zone": "x"} and nodes["a"]["devices"] == ["a/cuda:0"]
    assert nodes["b"]["problems"] == {"cuda": "no NVML"}
    assert qualify(a, [offline]) == []


def test_no_node_answering_is_an_offline_report_that_says_so() -> None:
    report = ClusterProvider(FakeCluster([])).probe()
    assert not report.online and report.reason == "no node of the cluster answered"


def test_the_node_agent_reads_declared_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "LLM_MANAGER_NODE_DEVICES",
        '[{"name": "Fake", "kind": "cuda", "index": 0, "memory_total_mib": 1234}]',
    )
    reports = {r.provider: r for r in NodeAgent().probe()}
    assert reports["cpu"].online
    assert [(d.name, d.memory_total) for d in reports["static"].devices] == [("Fake", 1234)]


# --- launching on a node --------------------------------------------------------------------


def test_the_engine_gets_the_nodes_environment_without_rays() -> None:
    node_env = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "RAY_JOB_ID": "01",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "LLM_MANAGER_NODE_DEVICES": "[]",
    }
    env = engine_env(node_env, {"CUDA_VISIBLE_DEVICES": "1", "LLM_MANAGER_MODEL": "m"})
    assert env == {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "CUDA_VISIBLE_DEVICES": "1",
        "LLM_MANAGER_MODEL": "m",
    }


def test_a_remote_launch_carries_only_what_the_manager_sets(tmp_path: Path) -> None:
    scheme = SchemeConfig(command="llm-manager llama --port {port} --host {host}", env={"A": "b"})
    plan = launch.build(
        scheme,
        name="m",
        aliases=[],
        port=9000,
        data_dir=tmp_path,
        base_dir=tmp_path,
        host="10.0.0.7",
        remote=True,
    )
    assert plan.argv == ["llm-manager", "llama", "--port", "9000", "--host", "10.0.0.7"]
    # No GPU given: none visible (Ray would otherwise leave every GPU visible).
    assert plan.env["CUDA_VISIBLE_DEVICES"] == ""
    assert plan.env["A"] == "b" and plan.env["LLM_MANAGER_HOST"] == "10.0.0.7"
    assert "PATH" not in plan.env  # the node's own
    on_node = launch.node_argv(plan.argv, plan.script, {"PATH": "/usr/bin"}, None)
    assert on_node[:3] == [sys.executable, "-m", "llm_manager"]
    with pytest.raises(StartFailed, match="not found"):
        launch.node_argv(["no-such-engine-xyz"], False, {"PATH": "/usr/bin"}, None)
    with pytest.raises(StartFailed, match="does not exist on this node"):
        launch.node_argv([str(tmp_path / "missing.sh")], True, {}, None)


def fake_argv(port: int, *switches: str) -> list[str]:
    """The fake model server's command with its placeholders filled (as a launch would)."""
    return [a.replace("{port}", str(port)).replace("{name}", "m") for a in fake_command(*switches)]


class InProcess:
    """HostCalls straight to an EngineHost in this process (what Ray carries across)."""

    def __init__(self) -> None:
        self.host = EngineHost()
        self.discarded = 0

    async def free_port(self, host: str) -> int:
        return await self.host.free_port(host)

    async def start(self, argv: Any, env: Any, cwd: str | None, script: bool) -> int:
        return await self.host.start(argv, env, cwd, script)

    async def lines(self, after: int, wait: float) -> tuple[list[tuple[int, str, str]], bool]:
        return await self.host.lines(after, wait)

    async def wait(self) -> int:
        return await self.host.wait()

    async def stop(self, grace: float) -> int:
        return await self.host.stop(grace)

    async def keep(self, kept: object) -> None:
        await self.host.keep(kept)

    def discard(self) -> None:
        self.discarded += 1


async def test_an_engine_on_a_node_logs_and_stops_with_its_grandchildren(
    spawn_log: Path,
) -> None:
    calls = InProcess()
    engine = RemoteEngine("a", "127.0.0.1", calls)
    port = await engine.free_port()
    lines: list[tuple[str, str]] = []
    argv = fake_argv(port, "--spawn-log", str(spawn_log), "--fork-grandchild")
    await engine.start(
        argv, {"CUDA_VISIBLE_DEVICES": "3"}, None, False, lambda s, m: lines.append((s, m))
    )
    await wait_until(lambda: any("CUDA_VISIBLE_DEVICES=3" in m for _, m in lines))
    grandchild = spawn_log.with_name(spawn_log.name + ".grandchild")
    await wait_until(lambda: bool(read_pids(grandchild)))
    pids = read_pids(spawn_log) + read_pids(grandchild)
    assert engine.returncode is None and all(alive(p) for p in pids)
    code = await engine.stop(2)
    assert code != LOST_CODE and engine.returncode == code
    assert calls.discarded == 1
    # SIGKILLed (the grandchild ignores SIGTERM): gone a moment later.
    await wait_until(lambda: not [p for p in pids if alive(p)], timeout=5)
    assert engine.describe_exit(code).endswith("on node a")


async def test_an_engine_whose_host_is_lost_ends_with_the_reason(spawn_log: Path) -> None:
    class Lost(InProcess):
        def __init__(self) -> None:
            super().__init__()
            self.gone = asyncio.Event()

        async def wait(self) -> int:
            await self.gone.wait()
            raise HostLost("The actor died because its node has died.")

        async def stop(self, grace: float) -> int:
            raise AssertionError("a lost host is not asked to stop")

    calls = Lost()
    engine = RemoteEngine("b", "127.0.0.1", calls)
    port = await engine.free_port()
    argv = fake_argv(port, "--spawn-log", str(spawn_log))
    await engine.start(argv, {}, None, False, lambda s, m: None)
    calls.gone.set()
    assert await asyncio.wait_for(engine.wait(), 5) == LOST_CODE
    assert engine.lost == "The actor died because its node has died."
    assert engine.describe_exit(LOST_CODE).startswith("ended: its node b left the cluster")
    assert await engine.stop(1) == LOST_CODE
    # In the real cluster the node's reaper ends the engine; here the host is in-process.
    await calls.host.stop(0)


async def test_a_start_refused_on_the_node_is_a_start_failure() -> None:
    engine = RemoteEngine("a", "127.0.0.1", InProcess())
    with pytest.raises(StartFailed, match="not found on PATH"):
        await engine.start(["no-such-engine-xyz"], {}, None, False, lambda s, m: None)


# --- configuration and the node command ------------------------------------------------------


def test_cluster_configuration_rules() -> None:
    base = "models:\n  m:\n    schemes:\n      s:\n        command: x\n"
    with pytest.raises(ConfigError, match="no 'cluster' section"):
        parse_text(base + "        nodes: {zone: a}\n", "t")
    with pytest.raises(ConfigError, match="every node declares its own"):
        parse_text(
            "cluster: {address: 'h:6379'}\ndevices:\n  - {name: g, memory_total_mib: 1}\n" + base,
            "t",
        )
    config = parse_text("cluster: {address: 'h:6379'}\n" + base + "        nodes: {zone: a}\n", "t")
    assert config.cluster is not None and config.cluster.namespace == "llm-manager"
    assert config.models["m"].schemes["s"].nodes == {"zone": "a"}


def test_the_node_command_advertises_the_devices() -> None:
    planned = joining.plan(
        address="10.0.0.5:6379",
        head=False,
        port=6379,
        name="gpu-1",
        labels=["zone=a"],
        devices=["RTX 4060:8188", "Other:4096:3"],
        token_file=None,
        block=False,
        probed=[],
    )
    argv = planned.argv
    assert argv[1:5] == ["start", "--address", "10.0.0.5:6379", "--num-gpus"] and argv[5] == "2"
    labels = dict(item.split("=") for item in argv[argv.index("--labels") + 1].split(","))
    assert labels == {
        "zone": "a",
        "llm-manager/node": "gpu-1",
        "llm-manager/gpus": "2",
        "llm-manager/gpu-mib": "4096",
        "llm-manager/gpu-name": "RTX-4060",
    }
    assert [d.index for d in planned.declared] == [0, 3]
    assert '"memory_total_mib": 8188' in planned.env["LLM_MANAGER_NODE_DEVICES"]


def test_the_node_command_refuses_bad_input() -> None:
    runner = CliRunner()
    for args in (
        ["node", "--dry-run"],
        ["node", "--head", "--address", "h:1", "--dry-run"],
        ["node", "--head", "--label", "no-equals", "--dry-run"],
        ["node", "--head", "--device", "nomib", "--dry-run"],
        ["node", "--head", "--token-file", "/no/such/token", "--dry-run"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output
    result = runner.invoke(cli, ["node", "--head", "--port", "6380", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--head --port 6380" in result.output


async def test_a_kept_host_stops_its_engine_once_its_owner_is_gone(spawn_log: Path) -> None:
    host = EngineHost()
    port = launch.free_port()
    argv = fake_argv(port, "--spawn-log", str(spawn_log))
    pid = await host.start(argv, {}, None, False)
    await host.keep({"model": "m"})
    assert (await host.describe())[:3] == ({"model": "m"}, pid, None)
    answers = iter([True, False, True, *[False] * 100])  # back once, then gone for good
    checks = 0

    async def owner_alive() -> bool:
        nonlocal checks
        checks += 1
        return next(answers)

    began = asyncio.get_running_loop().time()
    await asyncio.wait_for(host.guard(owner_alive, grace=0.3, period=0.05), 10)
    # The owner's return reset the count: the engine went 0.3 s after it was last there.
    assert asyncio.get_running_loop().time() - began >= 0.3 + 3 * 0.05
    assert checks >= 3 + 0.3 / 0.05
    await wait_until(lambda: not alive(pid), timeout=5)
    assert (await host.describe())[2] is not None  # ended, with its exit code


async def test_an_engine_is_followed_again_from_the_line_it_had_reached(spawn_log: Path) -> None:
    calls = InProcess()
    first = RemoteEngine("a", "127.0.0.1", calls)
    port = await first.free_port()
    argv = fake_argv(port, "--spawn-log", str(spawn_log), "--tick", "0.05")
    await first.start(argv, {}, None, False, lambda s, m: None)
    await wait_until(lambda: calls.host._seq >= 3)
    _, pid, code, seq = await calls.host.describe()
    assert code is None and pid == first.pid
    before = [m for n, _, m in calls.host._lines if n <= seq and m.startswith("tick")]
    last_tick = int(before[-1].split()[1])
    # Its owner restarted: a new RemoteEngine attaches to the same host, after line ``seq``.
    lines: list[str] = []
    second = RemoteEngine("a", "127.0.0.1", calls)
    second.attach(pid, seq, lambda s, m: lines.extend(m))
    await wait_until(lambda: len(lines) >= 2)
    assert all(line.startswith("tick") for line in lines)
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers[:2] == [last_tick + 1, last_tick + 2]  # nothing repeated, nothing lost
    await second.stop(2)
    assert second.returncode is not None and not alive(pid)


# --- device probes: an agent still starting is waited for (ray_backend.RayCluster.probe) ---


class _Ref:
    def __init__(self, delay: float, reports: list[ProviderReport]) -> None:
        self.delay = delay  # seconds until the agent answers
        self.reports = reports


class _FakeRay:
    """What RayCluster.probe uses of Ray: nodes(), wait() (a ref is ready when its delay
    is within the timeout asked), get(); every wait's timeout is recorded."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.waits: list[float] = []
        self.clock = 1000.0  # time.monotonic() for ray_backend: a wait takes its time

    def nodes(self) -> list[dict[str, Any]]:
        labels = "llm-manager/node"
        return [
            {
                "Alive": True,
                "NodeID": f"id-{n}",
                "NodeManagerAddress": "10.0.0.1",
                "Labels": {labels: n},
            }
            for n in self.names
        ]

    def wait(self, refs: list[_Ref], num_returns: int, timeout: float) -> tuple[list, list]:
        self.waits.append(timeout)
        ready = [r for r in refs if r.delay <= timeout]
        self.clock += timeout if len(ready) < len(refs) else max(r.delay for r in refs)
        return ready, [r for r in refs if r.delay > timeout]

    def monotonic(self) -> float:
        return self.clock

    def get(self, ref: _Ref) -> list[ProviderReport]:
        return ref.reports


class _FakeAgents:
    """The agent actor class: an agent's first answer takes ``first`` seconds (its worker
    process starting), later ones ``then``."""

    def __init__(self, first: float, then: float) -> None:
        self.delays = {"first": first, "then": then}
        self.calls: dict[str, int] = {}

    def options(self, name: str, **_: Any) -> Any:
        agents = self

        class Handle:
            def remote(self) -> Any:
                class Probe:
                    def remote(self) -> _Ref:
                        count = agents.calls[name] = agents.calls.get(name, 0) + 1
                        delay = agents.delays["first" if count == 1 else "then"]
                        return _Ref(delay, [ProviderReport("cpu", True, ())])

                handle = type("Agent", (), {})()
                handle.probe = Probe()
                return handle

        return Handle()


def _ray_cluster(
    monkeypatch: pytest.MonkeyPatch, fake: _FakeRay, agents: _FakeAgents
) -> ray_backend.RayCluster:
    monkeypatch.setattr(ray_backend, "_ray", lambda: fake)
    monkeypatch.setattr(ray_backend, "time", fake)  # its monotonic()
    cluster = ray_backend.RayCluster(ClusterConfig(probe_timeout=0.1, connect_timeout=5))
    cluster._agent_cls = agents
    monkeypatch.setattr(cluster, "_strategy", lambda node_id: None)
    return cluster


def test_a_starting_agent_is_waited_for_then_probe_timeout_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeRay(["w1", "w2"])
    agents = _FakeAgents(first=1.5, then=0.01)  # starting takes 15x probe_timeout
    cluster = _ray_cluster(monkeypatch, fake, agents)
    # The first probe: both agents are starting; they are waited for (connect_timeout).
    assert [node.name for node, _ in cluster.probe()] == ["w1", "w2"]
    assert fake.waits == [0.1, pytest.approx(4.9, abs=0.05)]
    # Both have answered once: probe_timeout alone from now on.
    fake.waits.clear()
    assert [node.name for node, _ in cluster.probe()] == ["w1", "w2"]
    assert fake.waits == [0.1]
    # An agent that has answered before and is now slow is left out, not waited for.
    agents.delays["then"] = 1.0
    fake.waits.clear()
    assert cluster.probe() == []
    assert fake.waits == [0.1]


def test_a_node_that_joins_later_gets_the_starting_grace_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeRay(["w1"])
    agents = _FakeAgents(first=0.01, then=0.01)
    cluster = _ray_cluster(monkeypatch, fake, agents)
    assert [node.name for node, _ in cluster.probe()] == ["w1"]
    fake.names.append("w2")  # joins; its agent starts slowly
    agents.delays["first"] = 2.0
    fake.waits.clear()
    assert [node.name for node, _ in cluster.probe()] == ["w1", "w2"]
    assert fake.waits == [0.1, pytest.approx(4.9, abs=0.05)]


def test_an_agent_that_never_starts_costs_one_wait_not_one_per_placement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _FakeRay(["w1"])
    agents = _FakeAgents(first=1e9, then=1e9)  # never answers
    cluster = _ray_cluster(monkeypatch, fake, agents)
    assert cluster.probe() == []
    assert fake.waits == [0.1, pytest.approx(4.9, abs=0.05)]  # connect_timeout in all
    fake.waits.clear()
    assert cluster.probe() == []
    assert fake.waits == [0.1]  # its grace is spent: probe_timeout, as any node
