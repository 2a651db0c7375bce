"""Config check: pinned models must be able to hold their memory all at once.

Pinned models are never evicted, so a set of them that cannot fit together on the
declared devices would leave some of them unable to ever start. Only declared devices
are known when a file is checked; device keys that match none of them (probed GPUs,
``cpu``) are checked at start, when the devices have been read.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from llm_manager.config import Config, ModelConfig
from llm_manager.devices.base import Device
from llm_manager.devices.static import StaticProvider
from llm_manager.models import scheduler
from llm_manager.models.sizing import declared_only

# Scheme combinations tried before giving up the search (and not reporting anything).
MAX_COMBINATIONS = 4096


def pinned_problems(config: Config) -> Iterator[tuple[tuple[str, ...], str]]:
    """One problem (YAML path, message) when the pinned models cannot all fit at once on
    the declared devices."""
    devices = list(StaticProvider(config.devices).probe().devices)
    problem = pinned_conflict(config.models, devices)
    if problem is not None:
        last = [name for name, spec in config.models.items() if spec.pinned][-1]
        yield (("models", last, "pinned"), problem)


def pinned_conflict(
    models: Mapping[str, ModelConfig],
    devices: Sequence[Device],
    where: str = "the declared devices",
) -> str | None:
    """Why the pinned models can never be loaded together on ``devices`` (each with all
    its memory free), or None. Device keys that match none of ``devices`` are not judged."""
    pinned = [(name, spec) for name, spec in models.items() if spec.pinned]
    if not pinned or not devices:
        return None
    empty = [replace(d, memory_free=d.memory_total) for d in devices]
    options = [
        # auto memory is not known before a run: only written numbers are judged.
        [(scheme, _known(declared_only(s.devices), empty)) for scheme, s in spec.schemes.items()]
        for _, spec in pinned
    ]
    first_failure: str | None = None
    for count, combo in enumerate(itertools.product(*options)):
        if count >= MAX_COMBINATIONS:
            return None  # too many to try: say nothing rather than guess
        failure = _place_all([name for name, _ in pinned], combo, empty)
        if failure is None:
            return None
        first_failure = first_failure or failure
    names = ", ".join(name for name, _ in pinned)
    return (
        f"the pinned models ({names}) can never be loaded together on {where}: "
        f"{first_failure}. Unpin one or lower their memory."
    )


def _known(needs: Mapping[str, int], devices: Sequence[Device]) -> dict[str, int]:
    return {k: mib for k, mib in needs.items() if any(scheduler.matches(k, d) for d in devices)}


def _place_all(
    names: Sequence[str], combo: Sequence[tuple[str, dict[str, int]]], devices: Sequence[Device]
) -> str | None:
    free = list(devices)
    for name, (scheme, needs) in zip(names, combo, strict=True):
        fit = scheduler.fit_scheme(scheme, needs, free)
        if not isinstance(fit, scheduler.Fit):
            return f"model {name!r}, {fit.describe()} once the others are loaded"
        free = scheduler.apply_claims(
            free, [scheduler.Claim(name, key, mib) for key, mib in fit.needs.items()]
        )
    return None
