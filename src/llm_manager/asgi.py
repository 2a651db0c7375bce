"""The outermost ASGI app: management paths go to FastAPI, everything else to the gateway.

Splitting before any framework code runs keeps the forwarding hot path free of FastAPI's
routing, validation and middleware; the management API keeps all of them.
"""

from __future__ import annotations

from llm_manager.gateway.forward import Receive, Scope, Send

_EXACT = frozenset(
    {"/", "/health", "/v1/models", "/openapi.json", "/docs", "/redoc", "/metrics", "/ui"}
)
_PREFIXES = ("/api/", "/docs/", "/ui/", "/v1/models/")


def is_management(path: str) -> bool:
    return path in _EXACT or path.startswith(_PREFIXES)


class Dispatcher:
    def __init__(self, management: object, gateway: object) -> None:
        self._management = management
        self._gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_management(scope["path"]):
            await self._gateway(scope, receive, send)  # type: ignore[operator]
        else:
            await self._management(scope, receive, send)  # type: ignore[operator]
