"""Which paths are Ollama's. Standard library only: auth.py and asgi.py import it."""

from __future__ import annotations

# Served: translated to the model's OpenAI endpoints (facade.py).
SERVED = frozenset(
    {
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/api/version",
    }
)
# Model management Ollama has and LLM-Manager does not: answered 501 in Ollama's shape.
UNSUPPORTED = frozenset({"/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"})
_UNSUPPORTED_PREFIX = "/api/blobs/"


def is_ollama(path: str) -> bool:
    return path in SERVED or path in UNSUPPORTED or path.startswith(_UNSUPPORTED_PREFIX)
