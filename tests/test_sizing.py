"""Unit tests of measured memory: the footprint book, the sizer's order of sources, and
out-of-memory evidence. The end-to-end behaviour (real processes) is in test_memory.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_manager.config import Amount, SchemeConfig
from llm_manager.devices.base import Device
from llm_manager.logs import LogLine
from llm_manager.models import footprint
from llm_manager.models.footprint import FootprintBook, definition_of, read_usages
from llm_manager.models.oom import out_of_memory
from llm_manager.models.sizing import Sizer, SizingSettings
from llm_manager.store.db import Database
from llm_manager.store.footprints import FootprintStore

TEN_PERCENT = SizingSettings(Amount(percent=10.0), measured_raises_declared=False)


def scheme(devices: dict[str, int | str], command: str = "engine --port {port}") -> SchemeConfig:
    return SchemeConfig.model_validate({"devices": devices, "command": command})


def read_usage(pid: int, devices: list[Device]) -> dict[str, int]:
    return read_usages({"m": pid}, devices).get("m", {})


def measured_book(s: SchemeConfig, peaks: dict[str, tuple[int, int]]) -> FootprintBook:
    """A book in which model m, scheme s ran once: (load, serve) peak per scheme key."""
    book = FootprintBook(None)
    book.begin("m", "s", definition_of(s), {k: k for k in peaks}, s.devices)
    book.record("m", {k: load for k, (load, _) in peaks.items()}, serving=False)
    book.ready("m")
    book.record("m", {k: serve for k, (_, serve) in peaks.items()}, serving=True)
    book.end("m")
    return book


# --- the book ------------------------------------------------------------------------------


def test_book_keeps_load_and_serve_peaks_per_scheme_key() -> None:
    s = scheme({"cuda:0": 4000, "cpu": 100})
    book = FootprintBook(None)
    # The scheme's "cuda:0" landed on the second GPU this run: kept under the scheme's key.
    book.begin("m", "s", definition_of(s), {"cuda:0": "cuda:1", "cpu": "cpu"}, s.devices)
    book.record("m", {"cuda:1": 3000, "cpu": 90}, serving=False)
    book.record("m", {"cuda:1": 3500, "cpu": 80}, serving=False)
    book.ready("m")
    warnings = book.record("m", {"cuda:1": 4200, "cpu": 95}, serving=True)
    assert warnings == ["measured 4200 MiB on cuda:0, above the 4000 MiB its scheme 's' declares"]
    assert book.record("m", {"cuda:1": 4300}, serving=True) == []  # warned once per run
    assert book.current("m") == {"cuda:1": 4300}
    fps = book.measured("m", "s", definition_of(s))
    assert (fps["cuda:0"].load_peak, fps["cuda:0"].serve_peak, fps["cuda:0"].runs) == (
        3500,
        4300,
        1,
    )
    assert (fps["cpu"].load_peak, fps["cpu"].serve_peak) == (90, 95)
    book.end("m")
    assert book.current("m") == {}


def test_a_changed_definition_starts_afresh() -> None:
    old = scheme({"cpu": "auto"}, "engine -c 4096")
    new = scheme({"cpu": "auto"}, "engine -c 32768")
    assert definition_of(old) != definition_of(new)
    # The memory written is not part of the definition: auto <-> a number keeps the figures.
    assert definition_of(old) == definition_of(scheme({"cpu": 512}, "engine -c 4096"))
    book = measured_book(old, {"cpu": (300, 320)})
    assert book.measured("m", "s", definition_of(new)) == {}
    book.begin("m", "s", definition_of(new), {"cpu": "cpu"}, new.devices)
    book.record("m", {"cpu": 900}, serving=False)
    [fp] = book.measured("m", "s", definition_of(new)).values()
    assert (fp.load_peak, fp.serve_peak, fp.runs) == (900, None, 0)  # not ready: no run


def test_book_survives_a_restart_through_the_store(tmp_path: Path) -> None:
    s = scheme({"cpu": "auto"})
    db = Database(tmp_path / "x.db")
    assert db.open()
    book = FootprintBook(FootprintStore(db))
    book.begin("m", "s", definition_of(s), {"cpu": "cpu"}, s.devices)
    book.record("m", {"cpu": 250}, serving=False)
    book.record("m", {"cpu": 260}, serving=False)  # a later, bigger reading replaces the row
    book.ready("m")
    book.record("m", {"cpu": 300}, serving=True)
    assert db.flush()
    db.close()
    db = Database(tmp_path / "x.db")
    assert db.open()
    again = FootprintBook(FootprintStore(db))
    again.load()
    [fp] = again.measured("m", "s", definition_of(s)).values()
    assert (fp.load_peak, fp.serve_peak, fp.runs, fp.peak) == (260, 300, 1, 300)
    db.close()


def test_read_usage_measures_a_process_tree() -> None:
    # A process that holds 64 MiB, and its own child that holds 32 MiB more.
    hold = (
        "import sys, time\n"
        "block = bytearray(int(sys.argv[1]) << 20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    parent_code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {hold!r}, '32'], stdout=subprocess.PIPE)\n"
        "child.stdout.readline()\n"
        f"exec({hold!r}.replace('int(sys.argv[1])', '64'))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent_code], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        gpu = Device("cuda:0", "cuda", "GPU", 8000, 1000, 7000, index=0)
        gpu = Device(**{**gpu.__dict__, "processes": ((proc.pid, 700), (999_999_999, 5))})
        usage = read_usage(proc.pid, [gpu])
        # Two interpreters (~10-30 MiB each) plus 96 MiB held.
        assert 96 <= usage["cpu"] < 96 + 80, usage
        assert usage["cuda:0"] == 700  # only our tree's processes count
        # A GPU listing none of the tree's processes has no reading (not a false zero).
        other = Device("cuda:1", "cuda", "GPU", 8000, 0, 8000, index=1, processes=((1, 5),))
        assert "cuda:1" not in read_usage(proc.pid, [other])
        # Where the kernel does not list children, one pass over the process table does.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(footprint, "_kernel_children", lambda pid: None)
            again = read_usage(proc.pid, [gpu])
        assert abs(again["cpu"] - usage["cpu"]) <= 2 and again["cuda:0"] == 700, again
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    time.sleep(0.05)
    assert read_usage(proc.pid, []) == {}


# --- the sizer -----------------------------------------------------------------------------


def test_declared_numbers_win_unless_measurements_may_raise_them() -> None:
    s = scheme({"cpu": 1000})
    book = measured_book(s, {"cpu": (1100, 1200)})
    need = Sizer(book, TEN_PERCENT, None).size("m", "s", s).devices["cpu"]
    assert (need.planned, need.source) == (1000, "declared")
    raising = SizingSettings(Amount(percent=10.0), measured_raises_declared=True)
    need = Sizer(book, raising, None).size("m", "s", s).devices["cpu"]
    assert (need.planned, need.source) == (1320, "measured")  # 1200 + 10 %
    # A measurement below the declared number does not lower it.
    low = measured_book(s, {"cpu": (300, 400)})
    assert Sizer(low, raising, None).size("m", "s", s).devices["cpu"].planned == 1000


def test_auto_takes_the_measurement_then_the_estimate_then_refuses() -> None:
    s = scheme({"cuda:0": "auto", "cpu": "auto"})
    calls = []

    def estimator(model: str, name: str, sch: SchemeConfig) -> dict[str, int] | None:
        calls.append(name)
        return {"cuda:0": 5000, "cpu": 700}

    measured = measured_book(s, {"cuda:0": (4000, 4500)})  # only the GPU was measured
    sized = Sizer(measured, TEN_PERCENT, estimator).size("m", "s", s)
    assert sized.needs == {"cuda:0": 4950, "cpu": 770}
    assert [sized.devices[k].source for k in ("cuda:0", "cpu")] == ["measured", "estimate"]
    assert sized.devices["cuda:0"].estimate == 5000  # shown beside the measurement
    margin = SizingSettings(Amount(mib=256), measured_raises_declared=False)
    assert Sizer(measured, margin, estimator).size("m", "s", s).needs == {
        "cuda:0": 4756,
        "cpu": 956,
    }
    sizer = Sizer(FootprintBook(None), TEN_PERCENT, None)
    sized = sizer.size("m", "s", s)
    assert sized.needs is None
    problem = sized.problem()
    assert problem is not None
    assert "'cuda:0', 'cpu'" in problem and "write the MiB it needs" in problem


def test_the_estimate_is_read_once_per_definition_and_its_failure_said() -> None:
    s = scheme({"cpu": "auto"})
    calls = []

    def failing(model: str, name: str, sch: SchemeConfig) -> dict[str, int] | None:
        calls.append(name)
        raise ValueError("model file not found: /x.gguf")

    sizer = Sizer(FootprintBook(None), TEN_PERCENT, failing)
    first = sizer.size("m", "s", s)
    second = sizer.size("m", "s", s)
    assert len(calls) == 1
    assert first.estimate_error == second.estimate_error == "model file not found: /x.gguf"
    problem = first.problem()
    assert problem is not None and "the estimate failed: model file not found" in problem


def test_presence_only_keys_stay_zero() -> None:
    s = scheme({"rtx": 0, "cpu": "auto"})
    book = measured_book(s, {"cpu": (100, 100)})
    assert Sizer(book, TEN_PERCENT, None).size("m", "s", s).needs == {"rtx": 0, "cpu": 110}


# --- out-of-memory evidence ------------------------------------------------------------------


def line(message: str, stream: str = "stderr") -> LogLine:
    return LogLine(1, 0.0, stream, message)


@pytest.mark.parametrize(
    "message",
    [
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 6144.00 MiB on device 0: "
        "cudaMalloc failed: out of memory",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "llama_model_load: error loading model: unable to allocate CUDA0 backend buffer",
        "alloc_tensor_range: failed to allocate CUDA0 buffer of size 9876543210",
        "terminate called after throwing an instance of 'std::bad_alloc'",
        "RuntimeError: HIP error: hipErrorOutOfMemory",
        "vk::Device::allocateMemory: ErrorOutOfDeviceMemory",
    ],
)
def test_out_of_memory_lines_are_recognised(message: str) -> None:
    evidence = out_of_memory([line("loading model"), line(message)], 1)
    assert evidence is not None and evidence.startswith("it printed: ")


def test_other_failures_are_not_out_of_memory() -> None:
    lines = [line("error: model file not found"), line("bind: address already in use")]
    assert out_of_memory(lines, 1) is None
    # The manager's own words do not count (a message quoting an earlier OOM).
    assert out_of_memory([line("out of memory while starting", "manager")], 1) is None
    # SIGKILL nobody asked for: the kernel's OOM killer; other signals are not.
    assert out_of_memory([], -signal.SIGKILL) is not None
    assert out_of_memory([], -signal.SIGTERM) is None
    # An exit while a GPU of its placement read full.
    full = "cuda:0 (H200) read full: 100 MiB free of 143771"
    assert out_of_memory([], 1, full) == f"it exited with code 1 while {full}"
    assert out_of_memory([], None, full) is None  # still running (stopped by us): no
