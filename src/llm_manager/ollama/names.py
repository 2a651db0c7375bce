"""Ollama's ``name:tag`` model names onto LLM-Manager's registry.

Tried in order: the name as sent (names, aliases, case-insensitive, unique prefixes, as
everywhere); for ``name:latest``, ``name``; for ``name:tag``, ``name-tag``. The first that
resolves wins; otherwise the registry's own "not found" for the name as sent.
"""

from __future__ import annotations

from llm_manager.errors import ModelNotFound
from llm_manager.models.runtime import ModelRuntime
from llm_manager.models.supervisor import Supervisor


def candidates(name: str) -> list[str]:
    found = [name]
    base, colon, tag = name.rpartition(":")
    if colon and base and tag:
        found.append(base if tag.casefold() == "latest" else f"{base}-{tag}")
    return found


def resolve(supervisor: Supervisor, name: str) -> ModelRuntime:
    first: ModelNotFound | None = None
    for candidate in candidates(name):
        try:
            return supervisor.resolve(candidate)
        except ModelNotFound as exc:
            first = first or exc
    assert first is not None
    raise first
