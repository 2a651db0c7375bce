"""Reading a GGUF file's header: its metadata and tensor table, never its weights.

A small streaming parser rather than ``gguf.GGUFReader``: the reader maps the whole file and
builds an array per field (8 s for the 250 MB quick-start model, against 0.15 s here), it
cannot read the quick-start GGUF while that is still split into its package's chunks (the
header alone sits in the first one), and the ``gguf`` package is only a development
dependency.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO


class EstimateError(Exception):
    """A llama.cpp scheme whose memory cannot be estimated: its command or its GGUF file
    cannot be read (a one-line reason)."""


# ggml tensor types: id -> (name, elements per block, bytes per block), as in the gguf
# package's GGML_QUANT_SIZES (a test keeps them equal). Copied so that estimates work without
# the gguf package, which only the development extra installs.
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}


@dataclass(frozen=True)
class Tensor:
    name: str
    type_name: str
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """The metadata and tensor sizes of a GGUF file (long arrays kept as their length)."""

    meta: dict[str, Any]
    tensors: tuple[Tensor, ...]

    @property
    def arch(self) -> str:
        return str(self.meta.get("general.architecture", ""))


@dataclass(frozen=True)
class LongArray:
    """An array too long to keep (token lists): only its length."""

    length: int


_KEEP_ARRAY = 4096  # arrays up to this length are kept (per-layer values); longer ones skipped
# GGUF value types (the spec's numbering) -> struct format of one element.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
_SCALARS[12] = "d"
_STRING, _ARRAY = 8, 9


class _Stream:
    """Little-endian reads from a binary file; EOF is an EstimateError."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle = handle
        self.path = path

    def read(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise EstimateError(f"{self.path}: the GGUF header is cut short")
        return data

    def skip(self, n: int) -> None:
        self.handle.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise EstimateError(f"{self.path}: unknown GGUF value type {vtype}")

    def array(self) -> Any:
        etype, length = self.unpack("I"), self.unpack("Q")
        if etype in _SCALARS and length > _KEEP_ARRAY:
            self.skip(length * struct.calcsize(_SCALARS[etype]))
            return LongArray(length)
        if etype == _STRING and length > _KEEP_ARRAY:
            for _ in range(length):
                self.skip(self.unpack("Q"))
            return LongArray(length)
        return [self.value(etype) for _ in range(length)]


def _tensor(stream: _Stream) -> Tensor:
    name = stream.string()
    dims = [stream.unpack("Q") for _ in range(stream.unpack("I"))]
    type_id = stream.unpack("I")
    stream.unpack("Q")  # offset of the data: not needed
    if type_id not in GGML_TYPES:
        raise EstimateError(f"{stream.path}: tensor {name} has unknown type {type_id}")
    type_name, block, size = GGML_TYPES[type_id]
    return Tensor(name, type_name, math.prod(dims) // block * size)


def read_header(path: Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor table (not its data)."""
    try:
        with open(path, "rb") as handle:
            stream = _Stream(handle, path)
            if stream.read(4) != b"GGUF":
                raise EstimateError(f"{path} is not a GGUF file (no GGUF magic)")
            version = stream.unpack("I")
            if version not in (2, 3):
                raise EstimateError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = stream.unpack("Q"), stream.unpack("Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = stream.string()
                meta[key] = stream.value(stream.unpack("I"))
            tensors = tuple(_tensor(stream) for _ in range(n_tensors))
    except FileNotFoundError:
        raise EstimateError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise EstimateError(f"model path is a directory, not a GGUF file: {path}") from None
    except OSError as e:
        raise EstimateError(f"cannot read {path}: {e.strerror or e}") from None
    return GGUFHeader(meta, tensors)
