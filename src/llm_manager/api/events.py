"""``GET /api/events``: the dashboard's live feed, as Server-Sent Events.

Polling and diffing on the server side: every ``interval`` seconds (and at once on
connect) the models' info and the devices are read, and each is sent only when it
changed since the last one this stream sent (the models' memory readings alone, at most
every MEMORY_EVERY seconds). Cheap: a dozen models, a cached device
snapshot. The stream ends when the manager begins to shut down.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from llm_manager.api import sse
from llm_manager.api.devices import all_devices
from llm_manager.api.views import all_models
from llm_manager.models.supervisor import Supervisor

INTERVAL_SECONDS = 1.0
# A change of the models' memory measurements alone (a reading, a new peak) is sent at most
# this often: a running model's memory moves at every sample, its state does not.
MEMORY_EVERY = 5.0
RETRY_MS = 2000


def _event(kind: str, body: dict[str, Any]) -> bytes:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def _steady(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The models' info less what moves by itself: the idle time (every second) and the
    memory measurements (every sample: see MEMORY_EVERY)."""
    return {
        name: {k: v for k, v in info.items() if k not in ("idle_time_sec", "memory")}
        for name, info in models.items()
    }


def _memory(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: info["memory"] for name, info in models.items()}


def _idle_reset(previous: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> bool:
    """True when a model's idle time went back (it served a request since)."""
    for name, info in current.items():
        before = previous.get(name)
        if before is not None and info["idle_time_sec"] < before["idle_time_sec"]:
            return True
    return False


async def read_state(supervisor: Supervisor) -> tuple[dict[str, Any], dict[str, Any]]:
    """(models body, devices body): the shapes of ``/api/models/all-models/info`` (less
    ``success``) and of ``/api/devices/info``'s ``devices``."""
    snapshot = await supervisor.monitor.snapshot()
    return all_models(supervisor, snapshot.devices), all_devices(supervisor, snapshot)


def router(supervisor: Supervisor, closing: asyncio.Event) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["system"])

    @api.get(
        "/events",
        summary="Live models and devices as Server-Sent Events (for the dashboard)",
        response_class=StreamingResponse,
    )
    async def events(
        interval: float = Query(
            INTERVAL_SECONDS,
            ge=0.2,
            le=60,
            allow_inf_nan=False,
            description="Seconds between two looks at the models and devices.",
        ),
    ) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            yield f"retry: {RETRY_MS}\n\n".encode()
            sent_models: dict[str, dict[str, Any]] | None = None
            sent_devices: dict[str, Any] | None = None
            last_write = models_sent_at = time.monotonic()
            while not closing.is_set():
                models, devices = await read_state(supervisor)
                current: dict[str, dict[str, Any]] = models["models"]
                now = time.monotonic()
                if (
                    sent_models is None
                    or _steady(current) != _steady(sent_models)
                    or _idle_reset(sent_models, current)
                    or (
                        now - models_sent_at >= MEMORY_EVERY
                        and _memory(current) != _memory(sent_models)
                    )
                ):
                    sent_models = current
                    last_write = models_sent_at = now
                    yield _event("models", models)
                if devices != sent_devices:
                    sent_devices = devices
                    last_write = time.monotonic()
                    yield _event("devices", {"devices": devices})
                if time.monotonic() - last_write >= sse.KEEPALIVE_SECONDS:
                    last_write = time.monotonic()
                    yield sse.KEEPALIVE
                try:
                    async with asyncio.timeout(interval):
                        await closing.wait()
                except TimeoutError:
                    pass
            yield _event("end", {"reason": "manager shutting down"})

        return sse.response(stream())

    return api
