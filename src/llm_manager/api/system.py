"""System endpoints: ``GET /``, ``GET /health``, ``GET /v1/models``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter

from llm_manager import __version__
from llm_manager.api.views import running_count
from llm_manager.cluster.replica import ReplicaSupervisor
from llm_manager.models.runtime import ModelRuntime
from llm_manager.models.supervisor import Supervisor


def router(
    supervisor: Supervisor, created: int, storage: Callable[[], dict[str, Any]]
) -> APIRouter:
    api = APIRouter(tags=["system"])

    @api.get("/", summary="Server information")
    async def root() -> dict[str, Any]:
        return {
            "message": "LLM-Manager API Server",
            "version": __version__,
            "models_url": "/v1/models",
        }

    @api.get("/health", summary="Health of the server and its models")
    async def health() -> dict[str, Any]:
        # Still "healthy" when records cannot be written: requests are served all the same;
        # "storage" says what is wrong.
        body = {
            "status": "healthy",
            "models_count": len(supervisor.runtimes),
            "running_models": running_count(supervisor.runtimes),
            "storage": storage(),
        }
        cluster = supervisor.cluster
        if cluster is not None:  # cluster mode: the nodes as last listed (no Ray call)
            shared: dict[str, Any] = {"nodes": [n.name for n in cluster.nodes()]}
            if isinstance(supervisor, ReplicaSupervisor):
                shared["controller"] = supervisor.controller_health()
            body["cluster"] = shared
        return body

    def entry(runtime: ModelRuntime) -> dict[str, Any]:
        return {
            "id": runtime.name,
            "object": "model",
            "created": created,
            "owned_by": "user",
            "aliases": list(runtime.spec.aliases),
            "mode": runtime.spec.mode,
            "status": runtime.state.value,
        }

    @api.get("/v1/models", summary="Models (OpenAI list format)")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [entry(r) for r in supervisor.runtimes]}

    @api.get("/v1/models/{model:path}", summary="One model (OpenAI retrieve format)")
    async def get_model(model: str) -> dict[str, Any]:
        return entry(supervisor.resolve(model))

    return api
