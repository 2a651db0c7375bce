"""Scheme choice, resource fit and eviction: pure functions over device snapshots.

Nothing here does I/O or holds state, so every rule of contract §4 is unit-testable.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from llm_manager.config import Amount
from llm_manager.devices.base import Device


@dataclass(frozen=True)
class Claim:
    """Memory a model holds (or is about to hold) on a device.

    ``shown`` is the part of it that a reading of the device already includes (what the
    model's processes were measured to hold, or all of it for a running model whose
    processes the reading cannot tell apart); only the rest is subtracted from a measured
    device's free memory, so nothing is counted twice.
    """

    model: str
    device_key: str
    mib: int
    shown: int = 0


@dataclass(frozen=True)
class Fit:
    scheme: str
    assignment: dict[str, str]  # scheme device key -> Device.key
    needs: dict[str, int]  # Device.key -> MiB
    node: str | None = None  # cluster mode: the node of every assigned device

    def gpu_indices(self, devices: Sequence[Device]) -> list[int]:
        by_key = {d.key: d for d in devices}
        return [
            idx
            for key in self.assignment.values()
            if (dev := by_key.get(key)) is not None
            and dev.kind == "cuda"
            and (idx := dev.index) is not None
        ]


@dataclass(frozen=True)
class Shortfall:
    scheme: str
    device: str  # the scheme's device key
    needed: int
    free: int
    missing: bool  # no such device online at all

    def describe(self) -> str:
        if self.missing:
            return f"scheme {self.scheme!r}: device {self.device!r} not present"
        return (
            f"scheme {self.scheme!r}: device {self.device!r} needs {self.needed} MiB, "
            f"{self.free} MiB free ({self.needed - self.free} MiB missing)"
        )


@dataclass(frozen=True)
class Holder:
    """A model that holds memory and could be evicted (never a pinned one).

    ``ready`` says whether it can be stopped now (idle, its turn over); one that is not
    can be planned for, and the model that needs its memory waits for it.
    """

    model: str
    last_used: float
    claims: tuple[Claim, ...]
    priority: int = 0
    ready: bool = True

    def cost(self) -> tuple[int, bool, float]:
        # Lower priorities first; among equals, one that can go now before one that must
        # be waited for; then least recently used.
        return (self.priority, not self.ready, self.last_used)


def _norm(text: str) -> str:
    return re.sub(r"[\s\-_]+", "", text).casefold()


def matches(key: str, device: Device) -> bool:
    """Contract §2: ``cpu``, ``cuda:N`` (``amd:N``), or a name substring ignoring case,
    spaces and dashes."""
    lowered = key.strip().casefold()
    if lowered == "cpu":
        return device.kind == "cpu"  # system memory, as probed; not a declared device
    family, colon, index = lowered.partition(":")
    if colon and family in ("cuda", "amd") and index.isdigit():
        return device.kind == family and device.index == int(index)
    if device.kind == "cpu":
        return False
    wanted = _norm(key)
    return bool(wanted) and wanted in _norm(device.name)


def apply_claims(devices: Sequence[Device], claims: Sequence[Claim]) -> list[Device]:
    """Free memory after subtracting the claims that measurements do not yet show."""
    out = []
    for dev in devices:
        held = sum(
            c.mib - (min(c.mib, c.shown) if dev.measured else 0)
            for c in claims
            if c.device_key == dev.key
        )
        if held > 0:
            free = max(0, dev.memory_free - held)
            dev = replace(dev, memory_free=free, memory_used=dev.memory_total - free)
        out.append(dev)
    return out


def keep_free(devices: Sequence[Device], headroom: Mapping[str, Amount]) -> list[Device]:
    """The devices with ``headroom`` taken off their free memory (never planned for).

    Keys are device keys (``cpu``, ``cuda:N``, a name) or ``gpu`` for every device that is
    not system memory; where several match a device, the largest amount applies."""
    if not headroom:
        return list(devices)
    out = []
    for dev in devices:
        amounts = [
            amount.of(dev.memory_total)
            for key, amount in headroom.items()
            if (key.strip().casefold() == "gpu" and dev.kind != "cpu") or matches(key, dev)
        ]
        keep = max(amounts, default=0)
        if keep:
            free = max(0, dev.memory_free - keep)
            dev = replace(dev, memory_free=free)
        out.append(dev)
    return out


def fit_scheme(name: str, needs: Mapping[str, int], devices: Sequence[Device]) -> Fit | Shortfall:
    """Assign each of the scheme's device keys to a distinct online device with room, all
    on one node (cluster mode: the node with the most free memory on the devices chosen;
    a node's shortfall is the one reported when none fits)."""
    nodes: dict[str | None, list[Device]] = {}
    for dev in devices:
        nodes.setdefault(dev.node, []).append(dev)
    if len(nodes) <= 1:
        return _fit_on_node(name, needs, devices)
    fits: list[Fit] = []
    shortfalls: list[Shortfall] = []
    for node_devices in nodes.values():
        result = _fit_on_node(name, needs, node_devices)
        if isinstance(result, Fit):
            fits.append(result)
        else:
            shortfalls.append(result)
    if fits:
        free = {d.key: d.memory_free for d in devices}
        return max(fits, key=lambda f: sum(free[k] for k in f.needs))
    # The closest miss: a device present somewhere, with the most free memory.
    return min(shortfalls, key=lambda s: (s.missing, s.needed - s.free))


def _fit_on_node(name: str, needs: Mapping[str, int], devices: Sequence[Device]) -> Fit | Shortfall:
    assignment: dict[str, str] = {}
    taken: set[str] = set()
    # Biggest needs first, so a large claim is not starved by a small one on a shared name.
    order = sorted(needs.items(), key=lambda kv: -kv[1])
    for key, mib in order:
        candidates = [d for d in devices if d.online and d.key not in taken and matches(key, d)]
        if not candidates:
            shortfall = Shortfall(name, key, mib, 0, missing=True)
            break
        roomy = [d for d in candidates if d.memory_free >= mib]
        if not roomy:
            best = max(candidates, key=lambda d: d.memory_free)
            shortfall = Shortfall(name, key, mib, best.memory_free, missing=False)
            break
        chosen = max(roomy, key=lambda d: d.memory_free)
        assignment[key] = chosen.key
        taken.add(chosen.key)
    else:
        return _fit(name, needs, assignment, devices)
    # The greedy pass can take the one device a later key needed (a name key grabbing
    # cuda:1 before a "cuda:1" key); look for any distinct assignment before giving up.
    matched = _match(order, [d for d in devices if d.online])
    if matched is not None:
        return _fit(name, needs, matched, devices)
    return shortfall


def _match(order: Sequence[tuple[str, int]], online: Sequence[Device]) -> dict[str, str] | None:
    """A distinct device with room for every key (bipartite matching), or None."""
    options = {
        key: [
            d.key
            for d in sorted(online, key=lambda d: -d.memory_free)
            if matches(key, d) and d.memory_free >= mib
        ]
        for key, mib in order
    }
    owner: dict[str, str] = {}  # Device.key -> scheme key

    def augment(key: str, seen: set[str]) -> bool:
        for dev in options[key]:
            if dev in seen:
                continue
            seen.add(dev)
            if dev not in owner or augment(owner[dev], seen):
                owner[dev] = key
                return True
        return False

    for key, _ in order:
        if not augment(key, set()):
            return None
    return {key: dev for dev, key in owner.items()}


def _fit(
    name: str, needs: Mapping[str, int], assignment: Mapping[str, str], devices: Sequence[Device]
) -> Fit:
    # In the scheme's own key order: CUDA_VISIBLE_DEVICES follows it, and engines' tensor
    # split flags follow CUDA_VISIBLE_DEVICES.
    ordered = {key: assignment[key] for key in needs}
    node = devices[0].node if devices else None  # one node's devices (fit_scheme)
    return Fit(name, ordered, {ordered[k]: mib for k, mib in needs.items()}, node)


def is_present(needs: Mapping[str, object], devices: Sequence[Device]) -> bool:
    """Whether every device the scheme names is online, ignoring memory."""
    return all(any(d.online and matches(key, d) for d in devices) for key in needs)


def choose(
    schemes: Sequence[tuple[str, Mapping[str, int]]], devices: Sequence[Device]
) -> Fit | list[Shortfall]:
    """The first scheme that fits, else every scheme's shortfall."""
    shortfalls: list[Shortfall] = []
    for name, needs in schemes:
        result = fit_scheme(name, needs, devices)
        if isinstance(result, Fit):
            return result
        shortfalls.append(result)
    return shortfalls


def plan_eviction(
    name: str,
    needs: Mapping[str, int],
    devices: Sequence[Device],
    holders: Sequence[Holder],
) -> list[str] | None:
    """The cheapest set of holders whose stopping makes the scheme fit.

    Holders are taken in order of cost (see ``Holder.cost``) until the scheme fits, then
    any taken holder that turns out not to be needed is left out again (the most costly
    first). Only holders of a device the scheme asks for are considered; None when even
    evicting all of them is not enough (or a device is simply absent).
    """
    relevant = [
        h
        for h in sorted(holders, key=Holder.cost)
        if any(
            any(matches(key, d) for key in needs)
            for c in h.claims
            for d in devices
            if d.key == c.device_key
        )
    ]

    def fits_without(chosen: Sequence[Holder]) -> bool:
        freed: dict[str, int] = {}
        for holder in chosen:
            for c in holder.claims:
                freed[c.device_key] = freed.get(c.device_key, 0) + c.mib
        trial = [
            replace(d, memory_free=min(d.memory_total, d.memory_free + freed.get(d.key, 0)))
            for d in devices
        ]
        return isinstance(fit_scheme(name, needs, trial), Fit)

    for count in range(1, len(relevant) + 1):
        if fits_without(relevant[:count]):
            chosen = relevant[:count]
            for holder in reversed(relevant[: count - 1]):
                fewer = [h for h in chosen if h is not holder]
                if fits_without(fewer):
                    chosen = fewer
            return [h.model for h in chosen]
    return None
