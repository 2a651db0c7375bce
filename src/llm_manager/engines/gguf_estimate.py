"""Estimate a llama.cpp scheme's memory from its GGUF file, before the model ever runs.

The estimate adds up what llama.cpp allocates (see docs/memory.md, "The GGUF estimate"):

- **weights**: the byte size of every tensor in the GGUF. Tensors ``blk.N.*`` belong to layer
  N; the output tensors (``output*``) form one more layer after the last; everything else (the
  token embeddings above all) stays on the host, as llama.cpp keeps its input layer on the CPU.
  With ``-ngl K`` the last K of those layers (output included) go to the GPUs, split by
  ``-ts`` proportions (evenly without it), with llama.cpp's own rule. On the CPU some quantized
  tensors are repacked into a second buffer (``CPU_REPACK``), counted once more.
- **KV cache**: ``cells x (n_head_kv x key_length x bytes(ctk) + n_head_kv x value_length x
  bytes(ctv))`` per layer, on the layer's device (the host with ``-nkvo``). Cells per
  sequence are ``ceil(n_ctx / n_parallel)`` rounded up to 256; sliding-window layers keep
  ``min(that, n_swa + n_ubatch rounded up to 256)`` cells. Encoders (BERT) have no KV cache.
- **compute buffers**: a per-token activation term ``n_ubatch x (4 n_ff + n_q + n_embd) x 4``
  bytes, attention masks ``cells x n_ubatch`` (f16 with flash attention, f32 without) and,
  without flash attention, the scores ``cells x n_ubatch x n_head x 4``; plus the logits
  output buffer ``n_parallel x n_vocab x 4``.
- **host overhead**: the bundled engine's process baseline plus the tokenizer's tables and
  each extra slot's sampling state, per vocabulary token (constants measured, see below).

Numbers are MiB (2**20 bytes), rounded up. The command's flags are read by
``llama_flags``, the GGUF header by ``gguf_header``.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_manager.config import SchemeConfig
from llm_manager.engines.gguf_header import (
    GGML_TYPES,
    EstimateError,
    GGUFHeader,
    LongArray,
    read_header,
)
from llm_manager.engines.llama_flags import LlamaArgs, llama_args
from llm_manager.models.launch import UPSTREAM_HOST, substitute

# The estimator's whole interface, the errors and flags of its two readers included.
__all__ = [
    "GGML_TYPES",
    "Estimate",
    "EstimateError",
    "LlamaArgs",
    "estimate",
    "estimate_for_scheme",
    "estimate_scheme",
    "gpu_keys",
    "llama_args",
    "model_shape",
    "read_header",
    "scheme_argv",
]

MIB = 1 << 20
# RSS of the bundled engine (`python -m llm_manager llama-server -t 1`) serving the tiny test
# models (tests/models/gguf_factory.py, 0.4 MiB of weights, 262-token vocabulary) minus
# their llama.cpp buffers: 61.4 MiB RSS - 2.2 MiB buffers (chat, -c 512) and 58.5 - 1.8 MiB
# (embedding), measured on a 2-core x86 VM with xllamacpp 2026.10.11549. It is the Python
# interpreter, the xllamacpp library and llama.cpp's server threads. A native llama-server
# binary has no Python in it and needs less; its baseline was not measured.
ENGINE_BASELINE_MIB = 59.0
# The same engine started as `python -m llm_manager.engines.llama_server` (as the tests do)
# skips the CLI's imports: 35.4 MiB RSS - 2.2 MiB buffers (tiny chat, -c 2048 -np 2).
MODULE_BASELINE_MIB = 33.0
# Host memory per vocabulary token (token texts, lookup maps, piece caches): Gemma 3 270M
# (262144 tokens) served with -c 512 and -c 2048 has 98 MiB of RSS beyond its weights,
# buffers and ENGINE_BASELINE_MIB, i.e. 39 MiB = 156 bytes per token. One model measured.
VOCAB_BYTES_PER_TOKEN = 160
# Each server slot beyond the first holds vocabulary-sized sampling state: Gemma 3 270M
# measured 4-5 MiB more RSS with -np 4 than the KV cache and buffers explain (-c 512 and
# -c 2048), i.e. about 1.5 MiB = 6 bytes per vocabulary token per extra slot.
SLOT_BYTES_PER_VOCAB_TOKEN = 6
# llama.cpp rounds cells per sequence (and the sliding-window cache) up to this (observed:
# -c 1000 gives 1024 cells; -c 1000 -np 3 gives 3 x 512; n_swa 512 + -ub 128 gives 768).
KV_PAD = 256
# Defaults of llama.cpp's common_params (xllamacpp.CommonParams() of the bundled engine).
DEFAULT_UBATCH = 512
DEFAULT_PARALLEL = 1
# Architectures without a KV cache: encoders that attend within one batch (embeddings).
ENCODER_ARCHS = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "t5encoder"}
)
# Recurrent or hybrid models keep a state whose size this estimate does not model.
RECURRENT_ARCHS = frozenset(
    {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba", "falcon-h1"}
    | {"granitehybrid", "qwen3next", "lfm2", "lfm2moe", "plamo2", "nemotron_h"}
)
# llama.cpp's hard-coded sliding-window layer patterns (set_swa_pattern(n)): in each group of
# n layers all but the last use the sliding window. GGUFs that store
# `{arch}.attention.sliding_window_pattern` are read from the file instead.
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2}
# Tensor types llama.cpp's CPU backend repacks into a second buffer (CPU_REPACK) on x86 with
# AVX2; other CPUs repack other sets. Measured: Gemma 3 270M's Q4_K tensors, 12.66 MiB.
REPACKED_TYPES = frozenset({"Q4_0", "Q4_K", "IQ4_NL"})
# Bytes per element of the KV cache types llama.cpp accepts for -ctk/-ctv: (block, bytes).
CACHE_TYPES = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}


# ----------------------------------------------------------------------------- model shape


@dataclass(frozen=True)
class Shape:
    """The hyperparameters the estimate uses, from the GGUF metadata."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int
    context_length: int
    n_swa: int
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window
    encoder: bool


def _per_layer(value: Any, n_layer: int, default: int) -> tuple[int, ...]:
    if isinstance(value, list) and value:
        return tuple(int(v) for v in value[:n_layer]) + (int(value[-1]),) * (n_layer - len(value))
    if isinstance(value, int | float):
        return (int(value),) * n_layer
    return (default,) * n_layer


def _ff_length(meta: Mapping[str, Any], arch: str) -> int:
    """The widest feed-forward activation per token (MoE: the active experts')."""
    dense = max(_per_layer(meta.get(f"{arch}.feed_forward_length"), 1, 0))
    expert = int(meta.get(f"{arch}.expert_feed_forward_length", 0))
    used = int(meta.get(f"{arch}.expert_used_count", 0))
    return max(dense, expert * used)


def _swa_layers(meta: Mapping[str, Any], arch: str, n_layer: int) -> tuple[bool, ...]:
    if not meta.get(f"{arch}.attention.sliding_window"):
        return (False,) * n_layer
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", SWA_PATTERNS.get(arch))
    if isinstance(pattern, list):
        flags = [bool(p) for p in pattern[:n_layer]]
        return tuple(flags + [False] * (n_layer - len(flags)))
    if isinstance(pattern, int) and pattern > 0:
        return tuple(il % pattern < pattern - 1 for il in range(n_layer))
    return (False,) * n_layer  # unknown pattern: every layer gets the full cache (more)


def _vocab_size(meta: Mapping[str, Any], arch: str) -> int:
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, LongArray):
        return tokens.length
    if isinstance(tokens, list):
        return len(tokens)
    return int(meta.get(f"{arch}.vocab_size", 0))


def model_shape(header: GGUFHeader, path: Path) -> Shape:
    meta, arch = header.meta, header.arch
    if not arch:
        raise EstimateError(f"{path}: no general.architecture in the GGUF")
    if arch in RECURRENT_ARCHS:
        raise EstimateError(f"{path}: architecture {arch!r} keeps a recurrent state not modelled")
    try:
        n_layer = int(meta[f"{arch}.block_count"])
        n_embd = int(meta[f"{arch}.embedding_length"])
        n_head = max(_per_layer(meta[f"{arch}.attention.head_count"], n_layer, 0))
    except KeyError as e:
        raise EstimateError(f"{path}: architecture {arch!r} lacks {e.args[0]}") from None
    head_dim = n_embd // n_head if n_head else 0
    return Shape(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=_per_layer(meta.get(f"{arch}.attention.head_count_kv"), n_layer, n_head),
        key_length=int(meta.get(f"{arch}.attention.key_length", head_dim)),
        value_length=int(meta.get(f"{arch}.attention.value_length", head_dim)),
        n_ff=_ff_length(meta, arch),
        n_vocab=_vocab_size(meta, arch),
        context_length=int(meta.get(f"{arch}.context_length", 0)),
        n_swa=int(meta.get(f"{arch}.attention.sliding_window", 0) or 0),
        swa_layers=_swa_layers(meta, arch, n_layer),
        encoder=arch in ENCODER_ARCHS,
    )


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    gpu_mib: tuple[int, ...]  # per GPU, in the order of the scheme's GPU keys
    host_mib: int  # host RAM (the process's RSS)
    parts: dict[str, float] = field(default_factory=dict)  # MiB by component
    notes: tuple[str, ...] = ()  # assumptions made


def _pad(n: int, to: int = KV_PAD) -> int:
    return -(-n // to) * to


def _cache_bytes(kind: str, elements: int) -> float:
    try:
        block, size = CACHE_TYPES[kind]
    except KeyError:
        raise EstimateError(
            f"unknown KV cache type {kind!r} (known: {', '.join(CACHE_TYPES)})"
        ) from None
    return elements / block * size


def _layer_of(name: str, n_layer: int) -> int | None:
    """The layer a tensor belongs to: N for blk.N.*, n_layer for the output, None (input)."""
    if name.startswith("blk."):
        index = name.split(".")[1]
        return int(index) if index.isdigit() else None
    if name.startswith("output"):
        return n_layer
    return None


def _layer_devices(n_layer: int, args: LlamaArgs, gpus: int, notes: list[str]) -> list[int]:
    """Device of each of the n_layer + 1 layers (the last is the output): -1 = host.

    llama.cpp offloads the last ``ngl`` of them; GPU ``g`` takes the layers whose position
    among the offloaded ones falls in its share of the cumulative split."""
    if gpus <= 0:
        return [-1] * (n_layer + 1)
    ngl = args.gpu_layers
    if ngl is None or ngl < 0:
        notes.append("-ngl auto (or absent) read as all layers on the GPU")
        ngl = n_layer + 1
    offloaded = min(ngl, n_layer + 1)
    start = n_layer + 1 - offloaded
    shares = list(args.tensor_split or ())[:gpus]
    shares += [0.0] * (gpus - len(shares))
    if sum(shares) <= 0:
        shares = [1.0] * gpus
    total, cumulative, acc = sum(shares), [], 0.0
    for s in shares:
        cumulative.append(acc / total)
        acc += s
    devices = []
    for il in range(n_layer + 1):
        if il < start:
            devices.append(-1)
            continue
        position = (il - start) / offloaded
        # Like llama.cpp: the last GPU whose cumulative start is <= the position.
        devices.append(max(g for g in range(gpus) if cumulative[g] <= position))
    return devices


def _context(args: LlamaArgs, shape: Shape, notes: list[str]) -> tuple[int, int]:
    """(sequences, cells per sequence) of the KV cache."""
    n_seq = max(args.parallel or DEFAULT_PARALLEL, 1)
    n_ctx = args.ctx_size or 0
    if n_ctx <= 0:
        n_ctx = shape.context_length or 4096
        notes.append(f"ctx {args.ctx_size or 0} = training context {n_ctx}")
    if args.kv_unified:
        return 1, _pad(n_ctx)
    return n_seq, _pad(-(-n_ctx // n_seq))


def _kv_layer_bytes(args: LlamaArgs, shape: Shape, il: int, cells: int) -> float:
    n_kv = shape.n_head_kv[il]
    keys = _cache_bytes(args.cache_type_k, cells * n_kv * shape.key_length)
    values = _cache_bytes(args.cache_type_v, cells * n_kv * shape.value_length)
    return keys + values


def _swa_cells(args: LlamaArgs, shape: Shape, cells: int, n_seq: int) -> int:
    if args.swa_full:
        return cells
    window = shape.n_swa * (n_seq if args.kv_unified else 1)
    return min(cells, _pad(window + (args.ubatch_size or DEFAULT_UBATCH)))


def _kv_bytes(
    args: LlamaArgs, shape: Shape, devices: Sequence[int], notes: list[str]
) -> tuple[dict[int, float], int, int]:
    """KV bytes per device (-1 = host), the full and the sliding-window cells per stream."""
    n_seq, cells = _context(args, shape, notes)
    if shape.encoder:
        notes.append(f"{shape.arch} is an encoder: no KV cache")
        return {}, 0, 0
    swa = _swa_cells(args, shape, cells, n_seq)
    if any(shape.swa_layers):
        notes.append(
            f"{sum(shape.swa_layers)} sliding-window layers keep {swa} cells per sequence "
            f"(n_swa {shape.n_swa} + n_ubatch, rounded to {KV_PAD})"
        )
    per_device: dict[int, float] = {}
    for il in range(shape.n_layer):
        layer_cells = swa if shape.swa_layers[il] else cells
        device = devices[il] if args.kv_offload else -1
        per_device[device] = per_device.get(device, 0.0) + n_seq * _kv_layer_bytes(
            args, shape, il, layer_cells
        )
    return per_device, cells, swa if any(shape.swa_layers) else 0


def _compute_bytes(args: LlamaArgs, shape: Shape, cells: int, swa_cells: int) -> float:
    """One device's compute buffer: activations per token of the micro-batch, attention
    masks and (without flash attention) the attention scores. Calibrated on the CPU against
    llama.cpp's reported `compute buffer size` (docs/memory.md)."""
    ubatch = args.ubatch_size or DEFAULT_UBATCH
    flash = args.flash_attn != "off"
    activations = ubatch * (4 * shape.n_ff + shape.n_head * shape.key_length + shape.n_embd) * 4
    attended = [c for c in (cells, swa_cells) if c] or [ubatch]  # encoders: the batch itself
    masks = sum(c * ubatch * (2 if flash else 4) for c in attended)
    scores = 0 if flash else max(attended) * ubatch * shape.n_head * 4
    return activations + masks + scores


def _weights(
    header: GGUFHeader, shape: Shape, devices: Sequence[int], gpus: int
) -> tuple[list[float], float, float]:
    """Weight bytes per GPU, on the host, and repacked on the host."""
    gpu = [0.0] * gpus
    host = repack = 0.0
    for t in header.tensors:
        layer = _layer_of(t.name, shape.n_layer)
        device = -1 if layer is None or layer >= len(devices) else devices[layer]
        if device >= 0:
            gpu[device] += t.nbytes
            continue
        host += t.nbytes
        if layer is not None and t.type_name in REPACKED_TYPES:
            repack += t.nbytes
    return gpu, host, repack


def estimate(args: LlamaArgs, gpus: int) -> Estimate:
    """The memory a llama.cpp server with these flags needs, on ``gpus`` GPUs and the host.

    Raises EstimateError when the GGUF cannot be read or its architecture is not modelled."""
    header = read_header(args.model)
    shape = model_shape(header, args.model)
    notes: list[str] = []
    devices = _layer_devices(shape.n_layer, args, gpus, notes)
    w_gpu, w_host, repack = _weights(header, shape, devices, gpus)
    kv, cells, swa_cells = _kv_bytes(args, shape, devices, notes)
    compute = _compute_bytes(args, shape, cells, swa_cells)
    if args.flash_attn in (None, "auto"):
        notes.append("flash attention auto read as on (llama.cpp enables it where supported)")
    n_seq = 1 if shape.encoder else max(args.parallel or DEFAULT_PARALLEL, 1)
    output = 0.0 if shape.encoder else n_seq * shape.n_vocab * 4
    host_layers = any(d < 0 for d in devices[: shape.n_layer + 1])
    ubatch = args.ubatch_size or DEFAULT_UBATCH
    # With every layer on a GPU the host keeps only the batch's inputs (token embeddings,
    # positions, masks): an unmeasured guess, no GPU was lent to calibrate it.
    compute_host = compute if host_layers else 3 * ubatch * shape.n_embd * 4
    compute_gpu = [compute if any(d == g for d in devices) else 0.0 for g in range(gpus)]
    overhead = _baseline_mib(args, notes) * MIB + shape.n_vocab * VOCAB_BYTES_PER_TOKEN
    overhead += (n_seq - 1) * shape.n_vocab * SLOT_BYTES_PER_VOCAB_TOKEN
    parts = {
        "weights_host": w_host / MIB,
        "weights_repacked": repack / MIB,
        "weights_gpu": sum(w_gpu) / MIB,
        "kv_host": kv.get(-1, 0.0) / MIB,
        "kv_gpu": sum(v for d, v in kv.items() if d >= 0) / MIB,
        "compute_host": compute_host / MIB,
        "compute_gpu": sum(compute_gpu) / MIB,
        "output": output / MIB,
        "overhead": overhead / MIB,
    }
    host = w_host + repack + kv.get(-1, 0.0) + compute_host + output + overhead
    gpu = [w_gpu[g] + kv.get(g, 0.0) + compute_gpu[g] for g in range(gpus)]
    if gpus:
        notes.append("CUDA/ROCm context per GPU not counted (unknown size)")
    return Estimate(
        gpu_mib=tuple(_mib(b) for b in gpu),
        host_mib=_mib(host),
        parts=parts,
        notes=tuple(notes),
    )


def _baseline_mib(args: LlamaArgs, notes: list[str]) -> float:
    if args.launcher == "module":
        return MODULE_BASELINE_MIB
    if args.launcher == "native":
        notes.append("a native llama-server's own baseline is unmeasured: the bundled one's used")
    return ENGINE_BASELINE_MIB


def _mib(nbytes: float) -> int:
    return max(1, math.ceil(nbytes / MIB))


# ----------------------------------------------------------------------------- schemes


def scheme_argv(scheme: SchemeConfig, *, name: str, data_dir: Path) -> list[str] | None:
    """The scheme's command with its placeholders filled in as launch.build does (a dummy
    port), without looking the program up on PATH; None for a script scheme."""
    if scheme.command is None:
        return None
    values = {
        "port": "8080",
        "name": name,
        "alias": name,
        "host": UPSTREAM_HOST,
        "data_dir": str(data_dir),
    }
    raw = scheme.command
    parts = shlex.split(raw) if isinstance(raw, str) else list(raw)
    return [substitute(p, values) for p in parts]


def _absolute(args: LlamaArgs, scheme: SchemeConfig, base_dir: Path) -> LlamaArgs:
    """A relative model path is relative to the process's working directory: the scheme's
    cwd (itself relative to the config's directory), else the manager's."""
    if args.model.is_absolute():
        return args
    if scheme.cwd:
        cwd = Path(scheme.cwd).expanduser()
        root = cwd if cwd.is_absolute() else base_dir / cwd
    else:
        root = Path.cwd()
    return LlamaArgs(**{**args.__dict__, "model": root / args.model})


def gpu_keys(keys: Iterable[str]) -> list[str]:
    return [k for k in keys if k != "cpu"]


def estimate_for_scheme(
    scheme: SchemeConfig, *, name: str, data_dir: Path, base_dir: Path
) -> Estimate | None:
    """The full Estimate of a scheme's llama.cpp command; None when it is not one."""
    argv = scheme_argv(scheme, name=name, data_dir=data_dir)
    parsed = llama_args(argv) if argv else None
    if parsed is None:
        return None
    gpus = len(gpu_keys(scheme.devices))
    return estimate(_absolute(parsed, scheme, base_dir), gpus)


def estimate_scheme(
    scheme: SchemeConfig, *, name: str, data_dir: Path, base_dir: Path
) -> dict[str, int] | None:
    """MiB per device key of the scheme: its GPU keys (all but "cpu") in order get the
    per-GPU estimate, "cpu" the host's. None when the scheme is not a llama.cpp command;
    EstimateError when it is one but its GGUF cannot be estimated."""
    result = estimate_for_scheme(scheme, name=name, data_dir=data_dir, base_dir=base_dir)
    if result is None:
        return None
    mib = dict(zip(gpu_keys(scheme.devices), result.gpu_mib, strict=True))
    if "cpu" in scheme.devices:
        mib["cpu"] = result.host_mib
    return {key: mib[key] for key in scheme.devices}
