"""The outermost ASGI app: management paths go to FastAPI, everything else to the gateway.

Splitting before any framework code runs keeps the forwarding hot path free of FastAPI's
routing, validation and middleware; the management API keeps all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from llm_manager.api.errors import error_response
from llm_manager.auth import KeyCheck, presented, required
from llm_manager.gateway.direct import DirectRelay
from llm_manager.gateway.forward import Gateway, Receive, Scope, Send
from llm_manager.ollama.facade import send_error as ollama_error
from llm_manager.ollama.paths import is_ollama
from llm_manager.web_guard import READ_METHODS, Refusal, WebGuard

_EXACT = frozenset(
    {"/", "/health", "/v1/models", "/openapi.json", "/docs", "/redoc", "/metrics", "/ui"}
)
_PREFIXES = ("/api/", "/docs/", "/ui/", "/v1/models/")


def is_management(path: str) -> bool:
    return path in _EXACT or path.startswith(_PREFIXES)


async def refuse(
    scope: Scope, receive: Receive, send: Send, management: bool, refusal: Refusal
) -> None:
    """403 for a request the web guard refuses, in the envelope of its path (OpenAI's for
    forwarded requests and /v1/*, the management API's for the rest), as the 401 of a
    missing key is."""
    response = error_response(
        scope["path"],
        403,
        refusal.message,
        refusal.detail,
        kind="permission_error",
        openai=None if management else True,
    )
    await response(scope, receive, send)


_OLLAMA_401 = (
    "missing or invalid API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
)
_BEARER = [(b"www-authenticate", b"Bearer")]


class Dispatcher:
    """Checks Host and Origin (``guard``, see web_guard.py) and the API key, then routes:
    the Ollama API's paths to ``ollama`` (when on), management paths to FastAPI, the rest
    to the gateway; refusals in the envelope of the path. Holds no state of its own."""

    def __init__(
        self,
        management: object,
        gateway: object,
        keys: KeyCheck,
        deny: Callable[[Scope, Receive, Send, bool], Awaitable[None]],
        guard: WebGuard | None = None,
        ollama: object | None = None,
    ) -> None:
        self._ollama = ollama
        self._management = management
        self._gateway = gateway
        self._keys = keys
        self._deny = deny
        self._guard = guard
        self._refuse = refuse  # an attribute: tests record refusals through it
        # The forwarding route's common case, served by the HTTP protocol itself
        # (gateway/direct.py, http_protocol.py); everything else comes through here.
        self.direct = DirectRelay(gateway, keys, guard) if isinstance(gateway, Gateway) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._management(scope, receive, send)  # type: ignore[operator]
            return
        path = scope["path"]
        # The Ollama API (ollama/): checked as any request, refused in Ollama's shape.
        ollama = self._ollama if self._ollama is not None and is_ollama(path) else None
        management = ollama is None and is_management(path)
        if self._guard is not None:
            # Forwarded requests run a model; management writes change state; the Ollama
            # API's POSTs run models.
            forwarded = ollama is None and not management
            writes = forwarded or scope["method"] not in READ_METHODS
            refusal = self._guard.check(scope["headers"], writes)
            if refusal is not None:
                if ollama is not None:
                    await ollama_error(send, 403, f"{refusal.message}: {refusal.detail}")
                else:
                    await self._refuse(scope, receive, send, management, refusal)
                return
        if self._keys.enabled:
            need = required(scope["method"], path, management)
            if not self._keys.allows(need, presented(scope["headers"])):
                if ollama is not None:
                    await ollama_error(send, 401, _OLLAMA_401, _BEARER)
                else:
                    await self._deny(scope, receive, send, management)
                return
        if ollama is not None:
            await ollama(scope, receive, send)  # type: ignore[operator]
        elif management:
            await self._management(scope, receive, send)  # type: ignore[operator]
        else:
            await self._gateway(scope, receive, send)  # type: ignore[operator]
