"""Telling an engine that ran out of memory while starting from one that failed otherwise.

The evidence is what engines print when an allocation fails (CUDA, ROCm, Vulkan, Metal,
PyTorch, llama.cpp, the C++ and C runtimes), a kill by SIGKILL that nobody asked for (the
kernel's out-of-memory killer), and an exit while a GPU it was placed on read (nearly) full.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence

from llm_manager.logs import LogLine

# Matched case-insensitively against each line an engine printed.
_SIGNATURES = re.compile(
    r"out of memory"  # CUDA "error: out of memory", torch.cuda.OutOfMemoryError text, Linux
    r"|outofmemoryerror"
    r"|cudamalloc failed"
    r"|cuda_error_out_of_memory"
    r"|hiperroroutofmemory"
    r"|erroroutofdevicememory"  # Vulkan VK_ERROR_OUT_OF_DEVICE_MEMORY
    r"|failed to allocate .{0,80}buffer"  # llama.cpp: failed to allocate CUDA0 buffer of size
    r"|unable to allocate .{0,40}backend buffer"
    r"|std::bad_alloc"
    r"|cannot allocate memory",
    re.IGNORECASE,
)
_MAX_EVIDENCE = 160


def out_of_memory(
    lines: Sequence[LogLine], exit_code: int | None, full_device: str | None = None
) -> str | None:
    """The evidence that a process ran out of memory (a line it printed, how it was
    killed, or a device of its placement seen full as it ended), or None. Only the engine's
    own lines count, not the manager's."""
    for line in lines:
        if line.stream == "manager":
            continue
        if _SIGNATURES.search(line.message):
            text = line.message.strip()
            if len(text) > _MAX_EVIDENCE:
                text = text[: _MAX_EVIDENCE - 1] + "…"
            return f"it printed: {text}"
    if exit_code == -signal.SIGKILL:
        return "it was killed by SIGKILL, as the kernel's out-of-memory killer does"
    if full_device is not None and exit_code is not None:
        return f"it exited with code {exit_code} while {full_device}"
    return None
