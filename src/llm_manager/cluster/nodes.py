"""The cluster's nodes as the planner sees them, and their devices under node-qualified keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from llm_manager.devices.base import Device, ProviderReport

if TYPE_CHECKING:
    from llm_manager.cluster.remote import RemoteEngine

NAME_LABEL = "llm-manager/node"  # set by `llm-manager node --name`


@dataclass(frozen=True)
class NodeInfo:
    name: str  # the label NAME_LABEL, else "node-" and the start of Ray's node id
    node_id: str
    address: str  # where its engines are reached
    labels: Mapping[str, str] = field(default_factory=dict)

    def carries(self, wanted: Mapping[str, str]) -> bool:
        """Whether the node has every label of a scheme's ``nodes:`` (``node`` is its name)."""
        for key, value in wanted.items():
            have = self.name if key == "node" else self.labels.get(key)
            if have != value:
                return False
        return True


def node_name(node_id: str, labels: Mapping[str, str]) -> str:
    return labels.get(NAME_LABEL) or f"node-{node_id[:8]}"


def qualify(node: NodeInfo, reports: Sequence[ProviderReport]) -> list[Device]:
    """A node's devices with keys of their own in the cluster ("NODE/cuda:0")."""
    return [
        replace(d, key=f"{node.name}/{d.key}", node=node.name)
        for r in reports
        if r.online
        for d in r.devices
    ]


class Cluster(Protocol):
    """What the manager uses of a cluster (cluster/ray_backend.py; fakes in tests)."""

    def nodes(self) -> list[NodeInfo]:
        """The live nodes as last listed (no I/O)."""

    def probe(self) -> list[tuple[NodeInfo, list[ProviderReport]]]:
        """Every live node's device readings; nodes that do not answer in time are left
        out. Blocks: called in a thread."""

    def usages(self, node: str, pids: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """What each model's engine (name -> its PID on that node) holds there, read by the
        node's agent, by the node's own device keys ("cpu", "cuda:0"). Blocks."""

    async def host(self, node: str, model: str) -> RemoteEngine:
        """An engine host on that node, ready for a start (StartFailed when it cannot be)."""

    def close(self) -> None:
        """Leave the cluster (its engines end with the manager's connection). Blocks."""
