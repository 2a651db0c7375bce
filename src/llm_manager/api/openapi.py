"""The management API's OpenAPI document, made to say what the endpoints really answer.

FastAPI declares 422 for invalid input; this API answers 400 in the seed's error shape.
Unknown models are 404, failed starts 502/503, and a few endpoints are not JSON.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR = {
    "title": "Error",
    "type": "object",
    "properties": {
        "success": {"type": "boolean", "const": False},
        "message": {"type": "string"},
        "error": {"type": "string"},
    },
    "required": ["success", "message"],
}
_OPENAI_ERROR = {
    "title": "OpenAIError",
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["integer", "string", "null"]},
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}
_REF = {"$ref": "#/components/schemas/Error"}
_OPENAI_REF = {"$ref": "#/components/schemas/OpenAIError"}
_NOT_JSON = {
    "/metrics": "text/plain",
    "/api/events": "text/event-stream",
    "/api/models/{alias}/logs/stream": "text/event-stream",
    "/ui": "text/html",
}


def _error(description: str, openai: bool = False) -> dict[str, Any]:
    schema = _OPENAI_REF if openai else _REF
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _adjust(schema: dict[str, Any]) -> dict[str, Any]:
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = _ERROR
    schemas["OpenAIError"] = _OPENAI_ERROR
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            openai = path.startswith("/v1/")  # the OpenAI error envelope there
            if responses.pop("422", None) is not None:
                responses["400"] = _error(
                    "Invalid request (the error says which parameter)", openai
                )
            params = {p.get("name") for p in op.get("parameters", [])}
            if "{alias}" in path or "{model}" in path or "model" in params:
                responses["404"] = _error("Unknown or ambiguous model name", openai)
            if path.endswith("/start") or path.endswith("/restart-autostart"):
                responses["503"] = _error("The model cannot start (devices, port, process)")
            if path.endswith("/start") or path.endswith("/stop") or path.endswith("/stop-all"):
                responses["502"] = _error("The model was stopped while the call waited")
            if path == "/api/config/reload":
                responses["400"] = _error("The new configuration is invalid (old one kept)")
            if path in ("/api/requests", "/api/usage"):
                responses["503"] = _error("The database is not available")
            media = _NOT_JSON.get(path)
            if media is not None and "200" in responses:
                responses["200"]["content"] = {media: {}}
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _adjust(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
