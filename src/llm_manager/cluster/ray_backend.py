"""The cluster on Ray: the manager joins as a driver, one NodeAgent per node reads its
devices, one EngineHost per engine runs it on the node the planner chose. Ray is used for
control only: requests go from the gateway to the engine's address.

The hosts and agents are named actors owned by the manager's connection (not detached):
when the manager ends, however it ends, Ray ends them, and each host's reaper kills its
engine's process group. Ray is imported here only (the ``cluster`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llm_manager.cluster import actors
from llm_manager.cluster.nodes import NodeInfo, node_name
from llm_manager.cluster.remote import HostLost, RemoteEngine
from llm_manager.config import ClusterConfig, LoadedConfig
from llm_manager.devices.base import ProviderReport
from llm_manager.errors import StartFailed

log = logging.getLogger(__name__)

HOST_READY_TIMEOUT = 30.0  # an engine host placed on a node answers within this
AGENT_PREFIX = "llm-manager-agent-"
HOST_PREFIX = "llm-manager-engine-"
# Detached hosts (keep_hosts), listed by kept_engines: a prefix of their own, so that a
# manager without replicas in the same namespace never has its hosts taken for them.
KEPT_PREFIX = "llm-manager-kept-"


class MissingExtra(RuntimeError):
    pass


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtra("cluster mode needs Ray: pip install 'llm-manager[cluster]'") from None
    return ray


def auth_environment(token_file: str | None) -> dict[str, str]:
    """Ray's token authentication, set in the environment before Ray connects."""
    if token_file is None:
        return {}
    path = Path(token_file).expanduser()
    if not path.is_file():
        raise RuntimeError(f"cluster.auth_token_file {path} does not exist")
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


class RayCluster:
    """The manager's connection to a Ray cluster (``Cluster`` of cluster/nodes.py)."""

    def __init__(self, config: ClusterConfig) -> None:
        self._config = config
        self._ray = _ray()
        self._nodes: list[NodeInfo] = []
        self._agents: dict[str, Any] = {}  # node id -> agent handle
        # Agents that have not answered yet: node id -> when the agent was created.
        self._starting: dict[str, float] = {}
        self._lock = threading.Lock()  # probe() runs in threads
        self._count = itertools.count(1)
        self._agent_cls: Any = None
        self._host_cls: Any = None
        self._kept_cls: Any = None
        self._keeper: tuple[str, float] | None = None  # keep_hosts

    @classmethod
    def connect(cls, config: ClusterConfig) -> RayCluster:
        """Join the cluster (blocks: call in a thread)."""
        # Before Ray is imported: it reads its authentication settings once, at import.
        os.environ.update(auth_environment(config.auth_token_file))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cluster = cls(config)
        ray = cluster._ray
        if not ray.is_initialized():
            ray.init(
                address=config.address,
                namespace=config.namespace,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        remote = ray.remote(num_cpus=0, max_restarts=0)
        cluster._agent_cls = remote(actors.NodeAgent)
        cluster._host_cls = remote(actors.EngineHost)
        cluster._kept_cls = remote(KeptHost)
        cluster._list_nodes()
        return cluster

    def nodes(self) -> list[NodeInfo]:
        return list(self._nodes)

    def _list_nodes(self) -> list[NodeInfo]:
        found = []
        for entry in self._ray.nodes():
            if not entry.get("Alive"):
                continue
            labels = dict(entry.get("Labels") or {})
            node_id = entry["NodeID"]
            found.append(
                NodeInfo(node_name(node_id, labels), node_id, entry["NodeManagerAddress"], labels)
            )
        self._nodes = found
        return found

    def _strategy(self, node_id: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id, soft=False)

    def probe(self) -> list[tuple[NodeInfo, list[ProviderReport]]]:
        """Every live node's device reports. A node whose agent has answered before gets
        ``probe_timeout``; an agent that has not answered yet (its worker process is still
        starting: seconds on a loaded machine) is waited for until ``connect_timeout`` after
        it was created, so that the first placement after a start or a join does not leave
        the node out as if it were lost. Never longer: a node whose agent never starts
        costs one such wait, not one per placement."""
        ray = self._ray
        with self._lock:
            nodes = self._list_nodes()
            live = {n.node_id for n in nodes}
            for gone in set(self._agents) - live:
                self._forget_agent(gone)
            calls = []
            for node in nodes:
                agent = self._agents.get(node.node_id)
                if agent is None:
                    agent = self._agent_cls.options(
                        name=AGENT_PREFIX + node.node_id,
                        get_if_exists=True,
                        scheduling_strategy=self._strategy(node.node_id),
                    ).remote()
                    self._agents[node.node_id] = agent
                    self._starting[node.node_id] = time.monotonic()
                calls.append((node, agent.probe.remote()))
            # How long the agents still starting may take, from now (0: none is).
            now = time.monotonic()
            grace = {
                ref: self._starting[node.node_id] + self._config.connect_timeout - now
                for node, ref in calls
                if node.node_id in self._starting
            }
        refs = [ref for _, ref in calls]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._config.probe_timeout)
        answered = set(ready)
        late = [ref for ref, left in grace.items() if ref not in answered and left > 0]
        if late:
            wait = max(grace[ref] for ref in late) - self._config.probe_timeout
            more, _ = ray.wait(late, num_returns=len(late), timeout=max(0.0, wait))
            answered.update(more)
        out = []
        for node, ref in calls:
            if ref not in answered:
                log.warning("node %s did not report its devices in time", node.name)
                continue
            try:
                out.append((node, ray.get(ref)))
            except Exception as exc:  # the node died meanwhile: left out of placement
                log.warning("node %s could not report its devices: %s", node.name, exc)
                with self._lock:
                    self._forget_agent(node.node_id)
                continue
            with self._lock:
                self._starting.pop(node.node_id, None)
        return out

    def _forget_agent(self, node_id: str) -> None:
        """Under the lock: the node's agent is gone (or its node is)."""
        self._agents.pop(node_id, None)
        self._starting.pop(node_id, None)

    def usages(self, node: str, pids: Mapping[str, int]) -> dict[str, dict[str, int]]:
        info = next((n for n in self._nodes if n.name == node), None)
        agent = self._agents.get(info.node_id) if info is not None else None
        if agent is None:
            return {}  # not probed yet, or gone: no reading this time
        try:
            found: dict[str, dict[str, int]] = self._ray.get(
                agent.usages.remote(dict(pids)), timeout=self._config.probe_timeout
            )
        except Exception as exc:  # the node died or is slow: skipped, as a failed reading
            log.debug("no memory reading from node %s: %s", node, exc)
            return {}
        return found

    def keep_hosts(self, owner: str, grace: float) -> None:
        """Engine hosts from now on are detached: they outlive their creator (the controller
        of gateway replicas, named ``owner``), which adopts them again after a restart
        (``kept_engines``); each stops its engine once ``owner`` has been gone for
        ``grace`` seconds."""
        self._keeper = (owner, grace)

    async def host(self, node: str, model: str) -> RemoteEngine:
        info = next((n for n in self._nodes if n.name == node), None)
        if info is None:
            raise StartFailed(f"node {node} is not in the cluster any more")
        if self._keeper is None:
            handle = self._host_cls.options(
                name=f"{HOST_PREFIX}{model}-{next(self._count)}",
                scheduling_strategy=self._strategy(info.node_id),
            ).remote()
        else:
            owner, grace = self._keeper
            handle = self._kept_cls.options(
                name=f"{KEPT_PREFIX}{model}-{uuid.uuid4().hex[:12]}",
                lifetime="detached",
                scheduling_strategy=self._strategy(info.node_id),
            ).remote(owner, self._config.namespace, grace)
        calls = _RayHostCalls(self._ray, handle)
        try:
            await asyncio.wait_for(handle.__ray_ready__.remote(), HOST_READY_TIMEOUT)
        except Exception as exc:
            calls.discard()
            raise StartFailed(f"no engine host could be placed on node {node}: {exc}") from None
        return RemoteEngine(info.name, info.address, calls)

    def kept_engines(self) -> list[tuple[RemoteEngine, Any, int, int]]:
        """The detached engine hosts of this namespace still running an engine: (the engine,
        not yet followed; what was kept; its PID; its last output line's number). Hosts
        whose engine ended, or that kept nothing (a start cut short), are ended. Blocks."""
        ray = self._ray
        self._list_nodes()
        found = []
        for name in ray.util.list_named_actors(all_namespaces=False):  # names, this namespace
            if not name.startswith(KEPT_PREFIX):
                continue
            try:
                handle = ray.get_actor(name)
                kept, pid, code, seq = ray.get(handle.describe.remote(), timeout=HOST_READY_TIMEOUT)
            except Exception as exc:  # gone meanwhile, or its node is
                log.warning("engine host %s cannot be adopted: %s", name, _first_line(exc))
                continue
            calls = _RayHostCalls(ray, handle)
            node = getattr(kept, "node", None)
            info = next((n for n in self._nodes if n.name == node), None)
            if kept is None or code is not None or not pid or info is None:
                calls.discard()
                continue
            found.append((RemoteEngine(info.name, info.address, calls), kept, pid, seq))
        return found

    def controller(self, loaded: LoadedConfig) -> Any:
        """The controller of gateway replicas (cluster/controller.py): the one running in
        the namespace, else one started now with this configuration, detached (it outlives
        any replica), on this node. Blocks: call in a thread."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from llm_manager.cluster import controller

        here = self._ray.get_runtime_context().get_node_id()
        cls = self._ray.remote(num_cpus=0, max_restarts=-1)(controller.Controller)
        for attempt in range(5):
            handle = cls.options(
                name=controller.NAME,
                get_if_exists=True,
                lifetime="detached",
                max_concurrency=1000,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
            ).remote(loaded)
            try:
                self._ray.get(handle.__ray_ready__.remote(), timeout=HOST_READY_TIMEOUT)
            except self._ray.exceptions.RayActorError:
                # One that was ending as it was found (its last replica left): once it
                # is gone, its name is free for a new one.
                if attempt == 4:
                    raise
                time.sleep(0.5)
                continue
            return handle
        raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.shutdown()


OWNER_CHECK = 2.0  # seconds between a kept host's checks that its owner is there


class KeptHost(actors.EngineHost):
    """A detached engine host (``RayCluster.keep_hosts``). Its owner's restart does not end
    it; its owner's end does, ``grace`` seconds later: it stops its engine and itself."""

    def __init__(self, owner: str, namespace: str, grace: float) -> None:
        super().__init__()
        self._owner = (owner, namespace)
        self._grace = grace
        self._guarding: asyncio.Task[None] | None = None

    async def start(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, script: bool
    ) -> int:
        pid = await super().start(argv, env, cwd, script)
        self._guarding = asyncio.create_task(self._guard())
        return pid

    async def _guard(self) -> None:
        await self.guard(self._owner_alive, self._grace, OWNER_CHECK)
        ray = _ray()
        if self._closed:  # stopped for want of an owner: nothing is left to host
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def _owner_alive(self) -> bool:
        ray = _ray()
        name, namespace = self._owner
        try:
            owner = await asyncio.to_thread(ray.get_actor, name, namespace)
            # Answered by a restarted owner too (the call makes it start its work).
            await asyncio.wait_for(owner.alive.remote(), 10.0)
        except Exception:
            return False
        return True


class _RayHostCalls:
    """EngineHost's methods as coroutines; Ray's "actor died" errors become HostLost."""

    def __init__(self, ray: Any, handle: Any) -> None:
        self._ray = ray
        self._handle = handle
        self._dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._handle, method).remote(*args)
        except self._dead as exc:
            raise HostLost(_first_line(exc)) from None

    async def free_port(self, host: str) -> int:
        port: int = await self._call("free_port", host)
        return port

    async def start(
        self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None, script: bool
    ) -> int:
        pid: int = await self._call("start", list(argv), dict(env), cwd, script)
        return pid

    async def lines(self, after: int, wait: float) -> tuple[list[tuple[int, str, str]], bool]:
        got: tuple[list[tuple[int, str, str]], bool] = await self._call("lines", after, wait)
        return got

    async def wait(self) -> int:
        code: int = await self._call("wait")
        return code

    async def stop(self, grace: float) -> int:
        code: int = await self._call("stop", grace)
        return code

    async def keep(self, kept: object) -> None:
        await self._call("keep", kept)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(self._handle, no_restart=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
