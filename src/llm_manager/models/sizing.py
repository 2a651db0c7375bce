"""How much memory a scheme is planned with on each of its devices.

A number written in the scheme is used as written (unless the operator lets measurements
raise it). ``auto`` takes, in order: the peak measured at earlier runs of the same scheme
definition plus ``memory_margin``; an estimate (the GGUF header of a llama.cpp command)
plus the margin; else the scheme cannot be planned and says which number to write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from llm_manager.config import AUTO, Amount, SchemeConfig
from llm_manager.models.footprint import FootprintBook, definition_of
from llm_manager.store.footprints import Footprint

log = logging.getLogger(__name__)

# (model, scheme name, scheme) -> MiB per scheme device key, or None when the scheme is not
# one that can be estimated. Raises ValueError (or a subclass) with the reason it failed.
Estimator = Callable[[str, str, SchemeConfig], "dict[str, int] | None"]


@dataclass(frozen=True)
class DeviceNeed:
    """One device key of a scheme: what was written, measured, estimated, and planned."""

    key: str
    declared: int | str  # MiB, or "auto"
    planned: int | None  # None: cannot be planned (auto with nothing to go by)
    source: str  # declared | measured | estimate | none
    measured: Footprint | None
    estimate: int | None


@dataclass(frozen=True)
class SchemeNeeds:
    scheme: str
    definition: str  # footprint.definition_of the scheme
    devices: dict[str, DeviceNeed]
    estimate_error: str | None = None

    @property
    def needs(self) -> dict[str, int] | None:
        """MiB per device key to plan with, or None when one of them cannot be planned."""
        out = {}
        for key, need in self.devices.items():
            if need.planned is None:
                return None
            out[key] = need.planned
        return out

    def problem(self) -> str | None:
        missing = [k for k, n in self.devices.items() if n.planned is None]
        if not missing:
            return None
        why = f" (the estimate failed: {self.estimate_error})" if self.estimate_error else ""
        keys = ", ".join(repr(k) for k in missing)
        example = f"{missing[0]}: 8GiB"
        return (
            f"scheme {self.scheme!r}: memory on {keys} is auto, and it has not been measured "
            f"yet nor can it be estimated{why}; write the MiB it needs (for example "
            f"'{example}') for its first run"
        )


@dataclass(frozen=True)
class SizingSettings:
    margin: Amount
    measured_raises_declared: bool


class Sizer:
    """Plans schemes' memory from the config, the footprint book and the estimator.

    Estimates are cached per scheme definition: a GGUF header is read once, not at every
    placement. Reading one takes up to a few tenths of a second (a large vocabulary), so the
    server reads them in a thread (``prepare``) and sizes with ``read=False``."""

    def __init__(
        self, book: FootprintBook, settings: SizingSettings, estimator: Estimator | None
    ) -> None:
        self.book = book
        self.settings = settings
        self._estimator = estimator
        # By (model, scheme, definition, device keys): the estimate is split over the keys.
        self._estimates: dict[tuple[object, ...], tuple[dict[str, int] | None, str | None]] = {}

    def size(
        self, model: str, scheme_name: str, scheme: SchemeConfig, *, read: bool = True
    ) -> SchemeNeeds:
        """How the scheme would be planned now. ``read=False``: an estimate not read yet
        counts as none (never blocks on a file)."""
        definition = definition_of(scheme)
        measured = self.book.measured(model, scheme_name, definition)
        cached = self._estimates.get(_estimate_key(model, scheme_name, scheme, definition))
        if cached is None and read:
            cached = self._estimate(model, scheme_name, scheme, definition)
        estimate, error = cached or (None, None)
        devices = {
            key: self._need(key, declared, measured.get(key), (estimate or {}).get(key))
            for key, declared in scheme.devices.items()
        }
        return SchemeNeeds(scheme_name, definition, devices, error)

    def _need(
        self, key: str, declared: int | str, fp: Footprint | None, estimate: int | None
    ) -> DeviceNeed:
        peak = fp.peak if fp is not None else None
        margin = self.settings.margin
        if isinstance(declared, int):
            if (
                self.settings.measured_raises_declared
                and declared
                and peak is not None
                and with_margin(peak, margin) > declared
            ):
                return DeviceNeed(
                    key, declared, with_margin(peak, margin), "measured", fp, estimate
                )
            return DeviceNeed(key, declared, declared, "declared", fp, estimate)
        if peak is not None:
            return DeviceNeed(key, declared, with_margin(peak, margin), "measured", fp, estimate)
        if estimate is not None:
            return DeviceNeed(
                key, declared, with_margin(estimate, margin), "estimate", fp, estimate
            )
        return DeviceNeed(key, declared, None, "none", fp, estimate)

    async def prepare(self, model: str, name: str, scheme: SchemeConfig) -> None:
        """Read the scheme's estimate, in a thread, unless it has been read already."""
        definition = definition_of(scheme)
        if _estimate_key(model, name, scheme, definition) not in self._estimates:
            await asyncio.to_thread(self._estimate, model, name, scheme, definition)

    def _estimate(
        self, model: str, name: str, scheme: SchemeConfig, definition: str
    ) -> tuple[dict[str, int] | None, str | None]:
        if self._estimator is None:
            return None, None
        try:
            result: tuple[dict[str, int] | None, str | None] = (
                self._estimator(model, name, scheme),
                None,
            )
        except (ValueError, OSError) as exc:
            level = logging.WARNING if needs_auto(scheme) else logging.DEBUG
            log.log(level, "model %s, scheme %s: no memory estimate: %s", model, name, exc)
            result = (None, str(exc))
        key = _estimate_key(model, name, scheme, definition)
        self._estimates[key] = result  # one assignment: thread-safe
        return result


def _estimate_key(
    model: str, name: str, scheme: SchemeConfig, definition: str
) -> tuple[object, ...]:
    return (model, name, definition, tuple(scheme.devices))


def with_margin(mib: int, margin: Amount) -> int:
    return mib + margin.of(mib)


def needs_auto(scheme: SchemeConfig) -> bool:
    return any(v == AUTO for v in scheme.devices.values())


def gguf_estimator(data_dir: Path, base_dir: Path) -> Estimator:
    """The GGUF estimate of llama.cpp schemes (engines/gguf_estimate.py)."""

    def estimate(model: str, name: str, scheme: SchemeConfig) -> dict[str, int] | None:
        from llm_manager.engines import gguf_estimate  # only where an estimate is asked for

        try:
            return gguf_estimate.estimate_scheme(
                scheme, name=model, data_dir=data_dir, base_dir=base_dir
            )
        except gguf_estimate.EstimateError as exc:
            raise ValueError(str(exc)) from None

    return estimate


def declared_only(needs: Mapping[str, int | str]) -> dict[str, int]:
    """The written numbers of a scheme (auto keys left out), for checks made before any
    measurement exists (pinned models at check-config)."""
    return {k: v for k, v in needs.items() if isinstance(v, int)}
