"""allocator.tune: glibc's malloc thresholds fixed, so that a megabyte body freed at an
exchange's end is used again for the next one instead of being given back to the system
and faulted in again, and bodies from 8 MiB on still go back to the system when freed.
Each case runs in a fresh Python process: the thresholds are process-wide."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_manager import allocator
from llm_manager.gateway.forward import _LARGE_BODY
from tests.test_cli_url import one_model
from tests.test_server_process import launch, stop_cleanly

glibc = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
needs_glibc = pytest.mark.skipif(not glibc, reason="the thresholds are glibc's")

_PROBE = """
import json, resource, sys
from llm_manager import allocator

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

tuned = allocator.tune() if sys.argv[1] == "tuned" else False
warm = b"w" * (1 << 20)  # a freed 1 MiB block raises glibc's own mmap threshold
del warm
start = faults()
for _ in range(100):
    # four 1 MiB bodies in flight, then let go, as at the end of their exchanges
    held = [bytes([65 + i]) * (1 << 20) for i in range(4)]
    del held
churn = faults() - start
before = rss_kib()
upload = b"u" * (9 << 20)  # an upload read into one buffer
during = rss_kib()
del upload
after = rss_kib()
print(json.dumps({"tuned": tuned, "faults": churn, "upload_kib": during - before,
                  "kept_kib": after - before}))
"""


def probe(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not allocator.user_tuned({k: v})}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, check=True
    )
    result: dict[str, int] = json.loads(done.stdout)
    return result


def test_the_large_block_threshold_is_the_relays_large_body() -> None:
    assert allocator.MMAP_THRESHOLD == _LARGE_BODY


@needs_glibc
def test_megabyte_bodies_are_used_again_and_large_uploads_given_back() -> None:
    untuned, tuned = probe("untuned"), probe("tuned")
    assert tuned["tuned"] and not untuned["tuned"]
    # Untuned, glibc trims the heap's free top on every round and the next round faults
    # its 1,024 pages in again (the probe can tell); tuned, they stay and are used again.
    assert untuned["faults"] > 100 * 512
    assert tuned["faults"] < untuned["faults"] / 20
    # A 9 MiB buffer is mapped apart and unmapped when freed: nothing of it stays.
    assert tuned["upload_kib"] > 8 * 1024
    assert tuned["kept_kib"] < 1024


def test_the_users_own_settings_are_kept() -> None:
    assert allocator.user_tuned({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert allocator.user_tuned({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert allocator.user_tuned({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not allocator.user_tuned({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "PATH": "/bin"})
    assert not allocator.tune({"MALLOC_TRIM_THRESHOLD_": "0"})  # left alone: not set


@needs_glibc
def test_serve_sets_them_unless_the_environment_does(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`llm-manager serve` tunes its own process at start, and leaves malloc alone when
    the user's environment sets glibc's variables."""
    for setting, expected in (
        (None, f"malloc thresholds: mmap {8 << 20}, trim {16 << 20}: True"),
        ("131072", "malloc thresholds left as the environment sets them"),
    ):
        if setting is None:
            monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
        else:
            monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", setting)
        folder = tmp_path / f"run-{setting}"
        folder.mkdir()
        m = launch(one_model(folder, spawn_log), folder, "--log-level", "debug")
        try:
            assert expected in m.log.read_text()
        finally:
            stop_cleanly(m)
