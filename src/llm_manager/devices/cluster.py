"""Cluster mode: every node's devices, read by its agent, as one report."""

from __future__ import annotations

from llm_manager.cluster.nodes import Cluster, qualify
from llm_manager.devices.base import ProviderReport


class ClusterProvider:
    """The devices of every live node that answers, under node-qualified keys
    ("gpu-box/cuda:0"); ``info`` lists the nodes (name, address, labels, devices)."""

    name = "cluster"

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def probe(self) -> ProviderReport:
        answers = self._cluster.probe()
        devices = []
        nodes = []
        for node, reports in answers:
            own = qualify(node, reports)
            devices.extend(own)
            nodes.append(
                {
                    "name": node.name,
                    "address": node.address,
                    "labels": dict(node.labels),
                    "devices": [d.key for d in own],
                    "problems": {r.provider: r.reason for r in reports if r.reason},
                }
            )
        reason = None if answers else "no node of the cluster answered"
        return ProviderReport(
            self.name,
            online=bool(answers),
            devices=tuple(devices),
            reason=reason,
            info={"nodes": nodes},
        )
