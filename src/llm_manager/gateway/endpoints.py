"""Which model modes may serve which endpoint (the mode gate, contract §5)."""

from __future__ import annotations

from typing import Final

CHAT: Final = "chat"
COMPLETION: Final = "completion"
EMBEDDING: Final = "embedding"
RERANK: Final = "rerank"

_KINDS: dict[str, str] = {}
for _prefix in ("/v1", ""):
    _KINDS[f"{_prefix}/chat/completions"] = CHAT
    _KINDS[f"{_prefix}/messages"] = CHAT
    _KINDS[f"{_prefix}/responses"] = CHAT
    _KINDS[f"{_prefix}/completions"] = COMPLETION
    _KINDS[f"{_prefix}/embeddings"] = EMBEDDING
    _KINDS[f"{_prefix}/rerank"] = RERANK
    _KINDS[f"{_prefix}/reranking"] = RERANK

# A chat model also completes raw text; a base model has no chat template.
_ALLOWED: dict[str, frozenset[str]] = {
    "chat": frozenset({CHAT, COMPLETION}),
    "base": frozenset({COMPLETION}),
    "embedding": frozenset({EMBEDDING}),
    "reranker": frozenset({RERANK}),
}


def kind_of(path: str) -> str | None:
    """The endpoint family of a path, or None for paths the gateway passes through as-is."""
    return _KINDS.get(path.rstrip("/") or "/")


def allowed(mode: str, kind: str | None) -> bool:
    return kind is None or kind in _ALLOWED[mode]
