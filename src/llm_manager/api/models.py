"""Model-management endpoints: info, start, stop, memory reset, restart-autostart, stop-all."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from llm_manager.api.views import all_models, model_info
from llm_manager.messages import Messages
from llm_manager.models.runtime import State
from llm_manager.models.supervisor import Supervisor

ALL_MODELS = "all-models"


def router(supervisor: Supervisor, say: Messages) -> APIRouter:
    api = APIRouter(prefix="/api/models", tags=["models"])

    @api.get("/{alias:path}/info", summary="One model's details, or every model's with all-models")
    async def info(alias: str) -> dict[str, Any]:
        devices = (await supervisor.monitor.snapshot()).devices
        if alias == ALL_MODELS:
            return {"success": True, **all_models(supervisor, devices)}
        runtime = supervisor.resolve(alias)
        return {"success": True, "model": model_info(supervisor, runtime, devices)}

    @api.post("/{alias:path}/start", summary="Start a model; waits until it is ready or failed")
    async def start(alias: str) -> dict[str, Any]:
        runtime = supervisor.resolve(alias)
        was_routing = runtime.state is State.ROUTING
        await runtime.ensure_ready()
        key = "already_running" if was_routing else "started"
        return {"success": True, "message": say(key, name=runtime.name)}

    @api.post(
        "/{alias:path}/stop", summary="Stop a model (SIGTERM, then SIGKILL after stop_timeout)"
    )
    async def stop(alias: str) -> dict[str, Any]:
        runtime = supervisor.resolve(alias)
        stopped = await runtime.stop("stop requested")
        key = "stopped" if stopped else "not_running"
        return {"success": True, "message": say(key, name=runtime.name)}

    @api.post(
        "/{alias:path}/memory/reset",
        summary="Forget a model's measured memory (its next runs measure afresh)",
    )
    async def reset_memory(alias: str) -> dict[str, Any]:
        runtime = supervisor.resolve(alias)
        count = await supervisor.footprints.forget(runtime.name)
        return {
            "success": True,
            "message": say("memory_forgotten", name=runtime.name, count=count),
            "forgotten": count,
        }

    @api.post("/restart-autostart", summary="Restart every auto_start model", response_model=None)
    async def restart_autostart() -> dict[str, Any] | JSONResponse:
        started, failed = await supervisor.restart_autostart()
        body: dict[str, Any] = {
            "success": not failed,
            "message": say("restarted", count=len(started)),
            "started_models": started,
        }
        if failed:
            body["failed_models"] = failed
            body["error"] = "; ".join(f"{name}: {why}" for name, why in failed.items())
            return JSONResponse(body, status_code=503)
        return body

    @api.post("/stop-all", summary="Stop every model")
    async def stop_all() -> dict[str, Any]:
        stopped = await supervisor.stop_all()
        return {"success": True, "message": say("stopped_all"), "stopped_models": stopped}

    return api
