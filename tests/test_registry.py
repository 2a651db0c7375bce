"""Model name resolution (contract §3): exact, then ignoring case, then a unique prefix."""

from __future__ import annotations

import random

import pytest

from llm_manager.errors import ModelNotFound
from llm_manager.models.registry import Registry

ENTRIES = [
    (
        "Qwen3-Coder-30B-A3B-Instruct-UD-64K",
        ["Qwen3-Coder-30B-A3B-Instruct-64K", "Qwen3-Coder-30B-A3B-Instruct"],
        "coder",
    ),
    ("qwen3-embedding", ["embed"], "embedding"),
    ("Llama-3-8B", ["llama"], "llama"),
    ("bge-reranker", [], "reranker"),
]


@pytest.fixture
def registry() -> Registry[str]:
    return Registry(ENTRIES)


def test_names_items_values_keep_order(registry: Registry[str]) -> None:
    assert registry.names == [e[0] for e in ENTRIES]
    assert registry.values() == [e[2] for e in ENTRIES]
    assert registry.items() == [(e[0], e[2]) for e in ENTRIES]
    assert len(registry) == 4


def test_accessors_return_copies(registry: Registry[str]) -> None:
    registry.names.clear()
    registry.values().clear()
    assert len(registry.names) == 4
    assert len(registry.values()) == 4


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Qwen3-Coder-30B-A3B-Instruct-UD-64K", "coder"),
        ("Qwen3-Coder-30B-A3B-Instruct-64K", "coder"),
        ("Qwen3-Coder-30B-A3B-Instruct", "coder"),
        ("qwen3-embedding", "embedding"),
        ("embed", "embedding"),
        ("llama", "llama"),
        ("bge-reranker", "reranker"),
    ],
)
def test_exact_name_or_alias(registry: Registry[str], name: str, expected: str) -> None:
    assert registry.resolve(name) == expected


def test_resolve_name_returns_the_model_name(registry: Registry[str]) -> None:
    assert registry.resolve_name("embed") == "qwen3-embedding"
    assert registry.resolve_name("Qwen3-Coder-30B-A3B-Instruct") == (
        "Qwen3-Coder-30B-A3B-Instruct-UD-64K"
    )


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("qwen3-coder-30b-a3b-instruct-ud-64k", "Qwen3-Coder-30B-A3B-Instruct-UD-64K"),
        ("QWEN3-CODER-30B-A3B-INSTRUCT", "Qwen3-Coder-30B-A3B-Instruct-UD-64K"),
        ("EMBED", "qwen3-embedding"),
        ("llama-3-8b", "Llama-3-8B"),
        ("BGE-Reranker", "bge-reranker"),
    ],
)
def test_case_insensitive(registry: Registry[str], name: str, expected: str) -> None:
    assert registry.resolve_name(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bge", "bge-reranker"),
        ("BGE-r", "bge-reranker"),
        ("qwen3-c", "Qwen3-Coder-30B-A3B-Instruct-UD-64K"),
        ("qwen3-coder-30b-a3b-instruct-u", "Qwen3-Coder-30B-A3B-Instruct-UD-64K"),
        ("qwen3-E", "qwen3-embedding"),
        ("emb", "qwen3-embedding"),
        ("Lla", "Llama-3-8B"),
    ],
)
def test_unique_prefix_ignoring_case(registry: Registry[str], name: str, expected: str) -> None:
    assert registry.resolve_name(name) == expected


def test_prefix_shared_by_aliases_of_one_model_is_unique(registry: Registry[str]) -> None:
    # "Qwen3-Coder-30B-A3B-Instruct-" prefixes the name and both aliases of one model only.
    assert registry.resolve("Qwen3-Coder-30B-A3B-Instruct-") == "coder"


def test_ambiguous_prefix(registry: Registry[str]) -> None:
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("qwen")
    err = info.value
    assert err.status == 404
    assert err.name == "qwen"
    assert err.known == registry.names
    assert "ambiguous" in err.message
    assert "Qwen3-Coder-30B-A3B-Instruct-UD-64K" in err.message
    assert "qwen3-embedding" in err.message
    assert "Llama-3-8B" not in err.message
    assert err.detail is not None and "bge-reranker" in err.detail


@pytest.mark.parametrize("name", ["mistral", "qwen4", "embedx", "llama-3-8b-extra", "", " "])
def test_no_match(registry: Registry[str], name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        registry.resolve(name)
    err = info.value
    assert err.known == registry.names
    assert "ambiguous" not in err.message
    assert "not found" in err.message
    assert err.detail == "known models: " + ", ".join(registry.names)


def test_exact_beats_case_insensitive() -> None:
    # Distinct models whose names differ only by case: the exact spelling wins.
    registry = Registry([("Model", [], 1), ("model", [], 2)])
    assert registry.resolve("Model") == 1
    assert registry.resolve("model") == 2


def test_exact_beats_prefix() -> None:
    registry = Registry([("qwen", [], "short"), ("qwen-coder", [], "long")])
    assert registry.resolve("qwen") == "short"
    assert registry.resolve("QWEN") == "short"  # case-insensitive match beats prefix
    assert registry.resolve("qwen-") == "long"


def test_alias_exact_beats_other_models_prefix() -> None:
    registry = Registry([("alpha-long", [], "a"), ("beta", ["alpha"], "b")])
    assert registry.resolve("alpha") == "b"
    with pytest.raises(ModelNotFound, match="ambiguous"):
        registry.resolve("alph")


def test_empty_registry() -> None:
    registry: Registry[int] = Registry([])
    assert len(registry) == 0
    with pytest.raises(ModelNotFound) as info:
        registry.resolve("anything")
    assert info.value.known == []
    assert info.value.detail == "known models: (none)"


def test_unicode_case_folding() -> None:
    registry = Registry([("Straße-Modell", [], 1)])
    assert registry.resolve("STRASSE-MODELL") == 1
    assert registry.resolve("strasse") == 1


def test_a_thousand_aliases_resolve_as_a_full_scan_would() -> None:
    """Prefix resolution uses bisect over sorted aliases; it must agree with a plain scan."""
    rng = random.Random(7)
    entries = [
        (f"model-{m}", [f"{rng.choice('abcQ')}{m}-{a}-{rng.randrange(99)}" for a in range(100)], m)
        for m in range(10)
    ]
    big = Registry(entries)
    folded = {alias.casefold(): name for name, aliases, _ in entries for alias in (name, *aliases)}
    probes = [alias[:cut] for alias in folded for cut in (1, 2, 3, len(alias))] + ["zz", "MODEL-9"]
    for probe in probes:
        owners = {owner for alias, owner in folded.items() if alias.startswith(probe.casefold())}
        if probe in big.names or probe.casefold() in folded:
            continue  # exact and case-insensitive matches come first, by design
        if len(owners) == 1:
            assert big.resolve_name(probe) == owners.pop()
        else:
            with pytest.raises(ModelNotFound):
                big.resolve_name(probe)
