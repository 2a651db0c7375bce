"""Which model modes may serve which endpoint (the mode gate, contract §5)."""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_to_bytes

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


def ambiguous_path(raw_path: bytes) -> bool:
    """Whether a path could mean another path to a model server than it does here.

    The mode gate judges the decoded path while the engine gets the raw one: dot segments,
    empty segments and encoded slashes or backslashes are what servers normalise
    differently, so such a path is refused rather than guessed at.
    """
    # The common case on str, where `in` is a plain search (one latin-1 character per
    # byte): CPython 3.11 first tries a bytes `in` operand as an integer and formats a
    # TypeError it then drops, 0.45 us a test (these four took 1.8 us per request).
    text = raw_path.decode("latin-1")
    if "%" not in text and "/." not in text and "//" not in text:
        return "\\" in text
    lowered = raw_path.lower()
    if b"%2f" in lowered or b"%5c" in lowered or b"\\" in raw_path or b"//" in raw_path:
        return True
    return any(unquote_to_bytes(part) in (b".", b"..") for part in raw_path.split(b"/"))
