"""The C allocator's thresholds for a server that relays request bodies of a megabyte.

glibc's malloc adjusts itself: once a block of 1 MiB is freed, it serves blocks of that size
from the heap and gives the heap's free top back to the system as soon as it exceeds twice
that. A gateway that joins each 1 MiB request body and lets go of it when the answer is out
then gives the memory back and faults it in again on every request (1.42x the CPU per 1 MiB
request, ab.py --body 1m), or, holding the bodies longer to avoid that, leaves its heap
fragmented (a peak RSS of 136 MiB instead of 89 after the benchmark's bodies). Fixed
thresholds give both: blocks below 8 MiB come from the heap and are used again, the heap
keeps up to 16 MiB free before it is trimmed, and blocks from 8 MiB on (the bodies read into
one buffer, gateway.forward._LARGE_BODY) are mapped apart and go back to the system when
freed. docs/performance.md ("Request bodies joined, the last full run, and memory after
large bodies") has the measurements.

Only glibc has these knobs; elsewhere (musl, macOS) nothing is changed. A user who set
glibc's own variables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or malloc tunables
in GLIBC_TUNABLES) keeps them.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

log = logging.getLogger("llm_manager")

MMAP_THRESHOLD = 8 << 20  # blocks this size and larger are mapped apart
TRIM_THRESHOLD = 16 << 20  # free heap top kept before it is given back

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment sets glibc's malloc thresholds itself."""
    if any(name in environ for name in _USER_SETTINGS):
        return True
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tune(environ: Mapping[str, str] = os.environ) -> bool:
    """Set fixed malloc thresholds for this process; True if they were set."""
    if user_tuned(environ):
        log.debug("malloc thresholds left as the environment sets them")
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
    except OSError:
        return False
    # musl and macOS have no such knobs (musl's mallopt does nothing)
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mapped = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    trimmed = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    done = bool(mapped and trimmed)
    log.debug("malloc thresholds: mmap %d, trim %d: %s", MMAP_THRESHOLD, TRIM_THRESHOLD, done)
    return done
