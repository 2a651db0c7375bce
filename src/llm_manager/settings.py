"""Where the configuration comes from (contract §1) and command-line overrides."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from llm_manager.config import LoadedConfig, load_file, parse_text

BUILTIN_SOURCE = "built-in quick-start configuration"
DEFAULT_FILE = "llm-manager.yaml"


def locate(explicit: str | None) -> Path | None:
    """``--config``, else ``$LLM_MANAGER_CONFIG``, else ``./llm-manager.yaml``, else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LLM_MANAGER_CONFIG")
    if env:
        return Path(env)
    local = Path(DEFAULT_FILE)
    return local if local.is_file() else None


def load(explicit: str | None) -> LoadedConfig:
    path = locate(explicit)
    if path is not None:
        loaded = load_file(path)
    else:
        text = resources.files("llm_manager").joinpath("quickstart.yaml").read_text("utf-8")
        loaded = LoadedConfig(parse_text(text, BUILTIN_SOURCE), BUILTIN_SOURCE, Path.cwd())
    return resolve_paths(loaded)


def reread(loaded: LoadedConfig, overrides: dict[str, object]) -> LoadedConfig:
    """The same source read again, with the same command-line overrides."""
    if loaded.source == BUILTIN_SOURCE:
        text = resources.files("llm_manager").joinpath("quickstart.yaml").read_text("utf-8")
        fresh = LoadedConfig(parse_text(text, BUILTIN_SOURCE), BUILTIN_SOURCE, loaded.base_dir)
    else:
        fresh = load_file(Path(loaded.source))
    fresh = resolve_paths(fresh)
    return with_server(fresh, **overrides) if overrides else fresh


def resolve_paths(loaded: LoadedConfig) -> LoadedConfig:
    """A relative ``data_dir`` is relative to the config file's directory."""
    server = loaded.config.server
    if server.data_dir.is_absolute():
        return loaded
    data_dir = (loaded.base_dir / server.data_dir).resolve()
    return with_server(loaded, data_dir=data_dir)


def with_server(loaded: LoadedConfig, **changes: object) -> LoadedConfig:
    server = loaded.config.server.model_copy(update=changes)
    config = loaded.config.model_copy(update={"server": server})
    return LoadedConfig(config, loaded.source, loaded.base_dir)
