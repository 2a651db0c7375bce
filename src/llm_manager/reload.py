"""Live reload of the configuration: SIGHUP, ``serve --watch`` and ``POST /api/config/reload``.

A new configuration is validated whole first; a bad one is refused with its problems logged
and the running one kept. Models whose definition did not change keep running untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_manager.config import ConfigError, LoadedConfig
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.devices.static import StaticProvider
from llm_manager.errors import BadRequest
from llm_manager.models.supervisor import Supervisor

log = logging.getLogger(__name__)

# What a reload applies to a running manager. Every other server key is read at start only.
LIVE_SERVER_KEYS = frozenset({"idle_timeout", "startup_timeout", "stop_timeout"})


class Reloader:
    """Owns the current configuration. One reload at a time."""

    def __init__(
        self,
        loaded: LoadedConfig,
        reread: Callable[[], LoadedConfig],
        supervisor: Supervisor,
        monitor: DeviceMonitor,
    ) -> None:
        self.loaded = loaded
        self._reread = reread
        self._supervisor = supervisor
        self._monitor = monitor
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Re-read and adopt the configuration; BadRequest (the old one stays) if invalid."""
        async with self._lock:
            try:
                new = await asyncio.to_thread(self._reread)
            except ConfigError as exc:
                problems = [str(p) for p in exc.problems]
                log.error("configuration not reloaded, the running one stays:\n  %s",
                          "\n  ".join(problems))  # fmt: skip
                raise BadRequest(
                    "the new configuration is invalid; the running one stays",
                    "; ".join(problems),
                ) from None
            old_server = self.loaded.config.server
            new_server = new.config.server
            restart_needed = sorted(
                f"server.{key}"
                for key in type(new_server).model_fields
                if key not in LIVE_SERVER_KEYS
                and getattr(old_server, key) != getattr(new_server, key)
            )
            # Joined and opened at start only (docs/cluster.md, docs/store.md).
            restart_needed += [
                key
                for key in ("cluster", "store")
                if getattr(new.config, key) != getattr(self.loaded.config, key)
            ]
            if new.config.devices != self.loaded.config.devices:
                self._monitor.replace(
                    "static", StaticProvider(new.config.devices) if new.config.devices else None
                )
            report: dict[str, Any] = self._supervisor.reload(new)
            report["restart_needed"] = restart_needed
            self.loaded = new
            log.info(
                "configuration reloaded: %s",
                ", ".join(f"{k}: {', '.join(v)}" for k, v in report.items() if v) or "no change",
            )
            return report

    async def reload_logged(self) -> None:
        """For signals and the file watcher: errors are logged, never raised."""
        try:
            await self.reload()
        except BadRequest:
            pass  # already logged with its problems
        except Exception:
            log.exception("configuration reload failed")

    async def watch(self, interval: float = 1.0) -> None:
        """Reload whenever the configuration file changes (polled: works for editors that
        replace the file, on every filesystem)."""
        path = Path(self.loaded.source)
        if not path.is_file():
            log.warning("--watch: %s is not a file; nothing to watch", self.loaded.source)
            return
        seen = _stamp(path)
        while True:
            await asyncio.sleep(interval)
            stamp = _stamp(path)
            if stamp != seen:
                seen = stamp
                log.info("%s changed: reloading", path)
                await self.reload_logged()


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime, st.st_size
