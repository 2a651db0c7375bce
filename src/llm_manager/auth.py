"""API keys: who may call what (contract §2, §6).

- ``/health``, ``/`` and the OpenAPI pages are open (CORS preflights are answered by the
  CORS layer in front, when CORS is on);
- ``/v1/*`` and every forwarded path need one of ``api_keys`` (an admin key works too);
- management writes (``POST``/``PUT``/``DELETE`` on ``/api/*``), ``/metrics`` and ``/ui``
  need one of ``admin_keys`` (or of ``api_keys`` when no admin key is set, so that setting
  only ``api_keys`` never leaves the management API open);
- management reads (``GET /api/*``) need any key once keys are set;
- the Ollama API's paths (``/api/chat``, ``/api/tags``..., ollama/paths.py) need one of
  ``api_keys``, as forwarded requests do, whatever the method.

Keys come as ``Authorization: Bearer KEY`` or ``x-api-key: KEY``; comparison takes the same
time whatever the key (no early exit on the first differing byte).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from enum import Enum

from llm_manager.ollama.paths import is_ollama

OPEN_PATHS = frozenset({"/", "/health", "/docs", "/redoc", "/openapi.json"})
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Need(Enum):
    NOTHING = 0
    ANY_KEY = 1
    API_KEY = 2
    ADMIN_KEY = 3


def required(method: str, path: str, management: bool) -> Need:
    # OPTIONS is no exception: a CORS preflight is answered before this check when CORS
    # is on (it carries no key), and any other OPTIONS is a request like the others.
    if path in OPEN_PATHS or path.startswith("/docs/"):
        return Need.NOTHING
    if path == "/metrics" or path == "/ui" or path.startswith("/ui/"):
        return Need.ADMIN_KEY
    if is_ollama(path):  # the Ollama API runs models, as the gateway does
        return Need.API_KEY
    if path.startswith("/api/"):
        return Need.ADMIN_KEY if method in _WRITE_METHODS else Need.ANY_KEY
    if not management or path.startswith("/v1/") or path == "/v1":
        return Need.API_KEY
    return Need.ANY_KEY


def presented(headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries, if any."""
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
        if name == b"x-api-key":
            return value.strip()
    return None


def _matches(key: bytes, keys: Sequence[bytes]) -> bool:
    found = False
    for candidate in keys:  # every key compared: the time does not tell which one matched
        found |= hmac.compare_digest(key, candidate)
    return found


class KeyCheck:
    """Immutable after construction; safe to call from any request."""

    def __init__(self, api_keys: Sequence[str], admin_keys: Sequence[str]) -> None:
        self._api = [k.encode() for k in api_keys]
        self._admin = [k.encode() for k in admin_keys] or self._api
        self.enabled = bool(self._api or self._admin)
        self.strip_forwarded = bool(self._api)

    def allows(self, need: Need, key: bytes | None) -> bool:
        if need is Need.NOTHING or not self.enabled:
            return True
        if need is Need.API_KEY and not self._api:
            return True  # only admin keys set: the gateway stays open
        if key is None:
            return False
        admin = _matches(key, self._admin)
        if need is Need.ADMIN_KEY:
            return admin
        return _matches(key, self._api) or admin
