"""The outermost ASGI app: management paths go to FastAPI, everything else to the gateway.

Splitting before any framework code runs keeps the forwarding hot path free of FastAPI's
routing, validation and middleware; the management API keeps all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from llm_manager.api.errors import error_response
from llm_manager.auth import KeyCheck, presented, required
from llm_manager.gateway.forward import Receive, Scope, Send
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


class Dispatcher:
    """Checks Host and Origin (``guard``, see web_guard.py) and the API key, then routes:
    management paths to FastAPI, the rest to the gateway. Holds no state of its own."""

    def __init__(
        self,
        management: object,
        gateway: object,
        keys: KeyCheck,
        deny: Callable[[Scope, Receive, Send, bool], Awaitable[None]],
        guard: WebGuard | None = None,
        refuse: Callable[[Scope, Receive, Send, bool, Refusal], Awaitable[None]] = refuse,
        ollama: object | None = None,
    ) -> None:
        self._ollama = ollama
        self._management = management
        self._gateway = gateway
        self._keys = keys
        self._deny = deny
        self._guard = guard
        self._refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if self._ollama is not None and is_ollama(path):
                await self._serve_ollama(self._ollama, scope, receive, send)
                return
            management = is_management(path)
            if self._guard is not None:
                # Forwarded requests run a model; management writes change state.
                writes = not management or scope["method"] not in READ_METHODS
                refusal = self._guard.check(scope["headers"], writes)
                if refusal is not None:
                    await self._refuse(scope, receive, send, management, refusal)
                    return
            if self._keys.enabled:
                need = required(scope["method"], path, management)
                if not self._keys.allows(need, presented(scope["headers"])):
                    await self._deny(scope, receive, send, management)
                    return
            if not management:
                await self._gateway(scope, receive, send)  # type: ignore[operator]
                return
        await self._management(scope, receive, send)  # type: ignore[operator]

    async def _serve_ollama(
        self, ollama: object, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """The Ollama API (ollama/): the guard as for any request (its POSTs are writes: they
        run models), the API key as for the gateway, refusals in Ollama's shape."""
        if self._guard is not None:
            refusal = self._guard.check(scope["headers"], scope["method"] not in READ_METHODS)
            if refusal is not None:
                await ollama_error(send, 403, f"{refusal.message}: {refusal.detail}")
                return
        if self._keys.enabled:
            need = required(scope["method"], scope["path"], False)
            if not self._keys.allows(need, presented(scope["headers"])):
                await ollama_error(
                    send,
                    401,
                    "missing or invalid API key: send it as 'Authorization: Bearer KEY' "
                    "or 'x-api-key: KEY'",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        await ollama(scope, receive, send)  # type: ignore[operator]
