"""Plain words for the CLI's human output. The API keeps the seed's field names and values
(``routing``, ``current_bat_path``, ``config_source``, ``Chat``); ``--json`` prints them
unchanged. The dashboard (``web/static/app.js``) uses the same words."""

from __future__ import annotations

from typing import Any

# Model states as a person says them. "routing" means requests are forwarded to it.
STATES: dict[str, str] = {
    "stopped": "stopped",
    "starting": "starting",
    "health_check": "loading",
    "routing": "ready",
    "stopping": "stopping",
    "failed": "failed",
}
RUNNING = frozenset({"starting", "health_check", "routing"})

# Fields of /api/models/{name}/info, in the order `llm-manager info` shows them.
FIELDS: dict[str, str] = {
    "model_name": "name",
    "aliases": "aliases",
    "mode": "mode",
    "status": "state",
    "failure_reason": "failure",
    "config_source": "scheme",
    "current_bat_path": "command",
    "is_available": "devices present",
    "port": "port",
    "pid": "pid",
    "idle_time_sec": "idle",
    "idle_timeout_sec": "idle timeout",
    "pending_requests": "requests in flight",
    "waiting": "requests waiting",
    "waiting_for": "waiting for room held by",
    "turn_ends_in_sec": "turn ends in",
    "pinned": "pinned",
    "priority": "priority",
    "auto_start": "auto start",
    "start_count": "starts",
}


def state(status: str) -> str:
    return STATES.get(status, status.replace("_", " "))


def mode(label: str) -> str:
    """The API's ``Chat`` as the configuration writes it: ``chat``."""
    return label.lower()


def seconds(value: float) -> str:
    value = max(0, int(value))
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m {value % 60}s"
    if value < 86400:
        return f"{value // 3600}h {value % 3600 // 60}m"
    return f"{value // 86400}d {value % 86400 // 3600}h"


def idle(info: dict[str, Any]) -> str:
    """How long a running model has had no request; nothing for a model that is not
    running (the API still counts from its last use)."""
    if info.get("status") not in RUNNING:
        return "-"
    if info.get("pending_requests"):
        return "busy"
    return seconds(info.get("idle_time_sec") or 0)


def field(key: str) -> str:
    return FIELDS.get(key, key.replace("_", " "))


def value(key: str, raw: Any, info: dict[str, Any]) -> str:
    """One info field's value as a person reads it."""
    if key == "status":
        return state(str(raw))
    if key == "mode":
        return mode(str(raw))
    if key == "idle_time_sec":
        return idle(info)
    if key == "idle_timeout_sec" and raw == 0:
        return "never"
    if key in ("idle_timeout_sec", "turn_ends_in_sec"):
        return "-" if raw is None else seconds(raw)
    if isinstance(raw, bool):
        return "yes" if raw else "no"
    if isinstance(raw, list):
        return ", ".join(str(v) for v in raw) or "-"
    return "-" if raw is None or raw == "" else str(raw)
