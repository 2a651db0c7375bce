"""The documentation against the code: every configuration key documented, every
documented key real, every example configuration valid, every documented endpoint served."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llm_manager.app import Application
from llm_manager.asgi import is_management
from llm_manager.config import (
    ClusterConfig,
    DeviceConfig,
    LoadedConfig,
    ModelConfig,
    SchemeConfig,
    ServerConfig,
    load_file,
    parse_text,
)
from llm_manager.gateway import endpoints

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
API = DOCS / "api.md"
README = ROOT / "README.md"

# Section heading of docs/configuration.md -> the model whose keys its table lists.
SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerConfig,
    "devices": DeviceConfig,
    "models": ModelConfig,
    "schemes": SchemeConfig,
    "cluster": ClusterConfig,
}
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_KEY_CELL = re.compile(r"^\|\s*`([^`]+)`\s*\|")
_ENDPOINT = re.compile(r"`(GET|POST|PUT|PATCH|DELETE|HEAD|ANY) (/[^`\s]*)`")
_PLACEHOLDER = re.compile(r"\{[^}/]*\}")


def _sections(text: str) -> dict[str, str]:
    """``## `name` `` headings of a Markdown page -> their text up to the next heading
    of any level (so the key table, not the tables of subsections)."""
    out: dict[str, str] = {}
    text = _FENCE.sub("", text)  # a "# comment" in a code block is not a heading
    for match in re.finditer(r"^## `([^`]+)`[ \t]*\n(.*?)(?=^#|\Z)", text, re.M | re.S):
        out[match.group(1)] = match.group(2)
    return out


def _table_keys(section: str) -> list[str]:
    """The first-column keys (`` | `name` | ``) of the tables in a section."""
    keys = []
    for line in section.splitlines():
        match = _KEY_CELL.match(line)
        if match:
            keys.append(match.group(1))
    return keys


def _yaml_blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in _FENCE.finditer(text)
        if m.group(1) in ("yaml", "yml")
    ]


def _full_configs(path: Path) -> list[tuple[int, str]]:
    """YAML blocks that hold a whole configuration (a top-level server: or models:)."""
    out = []
    for line, block in _yaml_blocks(path):
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue  # a fragment that is not YAML on its own
        if isinstance(data, dict) and ("models" in data or "server" in data):
            out.append((line, block))
    return out


def _shape(path: str) -> str:
    """A path with every ``{placeholder}`` made alike, for comparing routes."""
    return _PLACEHOLDER.sub("{}", path)


def _documented_endpoints() -> list[tuple[str, str]]:
    """``METHOD /path`` from the headings of docs/api.md."""
    found = []
    for line in API.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            found += _ENDPOINT.findall(line)
    return found


# --- configuration keys ------------------------------------------------------------------


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_config_key_is_documented_in_its_table(section: str) -> None:
    sections = _sections(CONFIGURATION.read_text(encoding="utf-8"))
    assert section in sections, f"docs/configuration.md has no '## `{section}`' section"
    documented = set(_table_keys(sections[section]))
    fields = set(SECTIONS[section].model_fields)
    missing = sorted(fields - documented)
    assert not missing, f"keys of `{section}` missing from its table: {missing}"


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_documented_config_key_exists(section: str) -> None:
    sections = _sections(CONFIGURATION.read_text(encoding="utf-8"))
    documented = _table_keys(sections[section])
    assert documented, f"no key table in the `{section}` section"
    unknown = sorted(set(documented) - set(SECTIONS[section].model_fields))
    assert not unknown, f"documented in `{section}` but not in the code: {unknown}"


def test_every_field_appears_in_a_table_row() -> None:
    rows = [
        line
        for line in CONFIGURATION.read_text(encoding="utf-8").splitlines()
        if line.startswith("|")
    ]
    for model in SECTIONS.values():
        for name in model.model_fields:
            assert any(f"`{name}`" in row for row in rows), f"`{name}` is in no table row"


# --- example configurations --------------------------------------------------------------


def test_example_config_file_is_valid() -> None:
    loaded = load_file(DOCS / "example-config.yaml")
    assert loaded.config.models, "the example should show models"
    assert loaded.config.devices, "the example should show declared devices"


def test_readme_shows_full_configs() -> None:
    # Guards the test below against passing because it found nothing to check.
    assert len(_full_configs(README)) >= 2, "README.md should show whole configurations"


@pytest.mark.parametrize("page", [CONFIGURATION, README], ids=lambda p: p.name)
def test_full_config_blocks_are_valid(page: Path) -> None:
    for line, block in _full_configs(page):
        # parse_text raises ConfigError listing every problem.
        parse_text(block, f"{page.name} (code block at line {line})")


# --- endpoints ---------------------------------------------------------------------------


async def _management_routes(tmp_path: Path) -> set[tuple[str, str]]:
    text = f"server: {{data_dir: {str(tmp_path / 'data')!r}}}\n"
    loaded = LoadedConfig(parse_text(text, "test"), "test", tmp_path)
    app = await Application.create(loaded)
    try:
        paths = app.management.openapi()["paths"]
    finally:
        await app.http.close()
        app.upstream.close()
    return {
        (method.upper(), _shape(path))
        for path, operations in paths.items()
        for method in operations
    }


async def test_documented_endpoints_exist(tmp_path: Path) -> None:
    routes = await _management_routes(tmp_path)
    documented = _documented_endpoints()
    assert len(documented) >= 10, f"too few endpoint headings found: {documented}"
    for method, path in documented:
        if is_management(path):
            assert (method, _shape(path)) in routes, f"{method} {path} is not served"
        else:
            # Not a management path: the gateway forwards it, with any method.
            assert method == "ANY" or endpoints.kind_of(path) is not None, (
                f"{method} {path} is forwarded; document it as ANY or as an endpoint family"
            )


async def test_every_management_route_is_documented(tmp_path: Path) -> None:
    routes = await _management_routes(tmp_path)
    documented = {(m, _shape(p)) for m, p in _documented_endpoints()}
    missing = sorted(routes - documented)
    assert not missing, f"endpoints without a heading in docs/api.md: {missing}"


def test_documented_gateway_families_match_the_code() -> None:
    text = API.read_text(encoding="utf-8")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"):
        assert f"`{path}`" in text
        assert endpoints.kind_of(path) is not None
        assert not is_management(path)
