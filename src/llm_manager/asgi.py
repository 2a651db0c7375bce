"""The outermost ASGI app: management paths go to FastAPI, everything else to the gateway.

Splitting before any framework code runs keeps the forwarding hot path free of FastAPI's
routing, validation and middleware; the management API keeps all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from llm_manager.auth import KeyCheck, presented, required
from llm_manager.gateway.forward import Receive, Scope, Send

_EXACT = frozenset(
    {"/", "/health", "/v1/models", "/openapi.json", "/docs", "/redoc", "/metrics", "/ui"}
)
_PREFIXES = ("/api/", "/docs/", "/ui/", "/v1/models/")


def is_management(path: str) -> bool:
    return path in _EXACT or path.startswith(_PREFIXES)


class Dispatcher:
    """Checks the API key, then routes: management paths to FastAPI, the rest to the
    gateway. Holds no state of its own."""

    def __init__(
        self,
        management: object,
        gateway: object,
        keys: KeyCheck,
        deny: Callable[[Scope, Receive, Send, bool], Awaitable[None]],
    ) -> None:
        self._management = management
        self._gateway = gateway
        self._keys = keys
        self._deny = deny

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            management = is_management(path)
            if self._keys.enabled:
                need = required(scope["method"], path, management)
                if not self._keys.allows(need, presented(scope["headers"])):
                    await self._deny(scope, receive, send, management)
                    return
            if not management:
                await self._gateway(scope, receive, send)  # type: ignore[operator]
                return
        await self._management(scope, receive, send)  # type: ignore[operator]
