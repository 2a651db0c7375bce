"""An Ollama request's ``keep_alive``, clamped to the administrator's floor and ceiling.

Ollama accepts a number of seconds or a Go duration (``5m``, ``1h30m``, ``-1``); 0 unloads
the model after the request, a negative value keeps it loaded forever.
"""

from __future__ import annotations

import math
import re

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
UNLOAD = 0.001  # an idle timeout this short stops the model at the next idle check
FOREVER = 0.0  # the runtime's "never idle"


def parse(value: object) -> float:
    """Seconds; negative = forever. Raises ValueError on anything else."""
    if isinstance(value, bool) or value is None:
        raise ValueError("keep_alive must be a duration (5m, 1h, -1) or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            sign = -1.0 if text.startswith("-") else 1.0
            body = text.lstrip("+-")
            parts = _PART.findall(body)
            if not body or "".join(a + u for a, u in parts) != body:
                raise ValueError(
                    f"keep_alive {value!r} is not a duration (use 5m, 1h30m, 300s or -1)"
                ) from None
            seconds = sign * sum(float(amount) * _UNIT[unit] for amount, unit in parts)
    else:
        raise ValueError("keep_alive must be a duration (5m, 1h, -1) or a number of seconds")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError("keep_alive must be finite")
    return seconds


def idle_timeout(seconds: float, floor: float, ceiling: float) -> float:
    """The idle timeout a keep_alive asks for, within [floor, ceiling] (ceiling 0 = none),
    in the runtime's terms: UNLOAD for "now", FOREVER (0) for "never"."""
    if seconds < 0:  # forever, if the ceiling allows it
        return ceiling if ceiling > 0 else FOREVER
    if ceiling > 0:
        seconds = min(seconds, ceiling)
    seconds = max(seconds, floor)
    return seconds if seconds > 0 else UNLOAD
