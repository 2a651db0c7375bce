"""Smoke test of the turns benchmark: ``benchmarks/turns.py --quick`` in a subprocess (two
agents alternating between two models that do not fit together), checked through its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.test_benchmarks import check_no_leftovers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "turns.py"
TIMEOUT = 60


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("turns") / "turns.json"
    # coreutils' timeout ends it with SIGTERM, on which it stops what it started
    argv = ["timeout", "-k", "25", str(TIMEOUT), sys.executable, str(SCRIPT), "--quick"]
    proc = subprocess.run(
        [*argv, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT + 30
    )
    assert proc.returncode != 124, f"the quick turns benchmark ran past {TIMEOUT} s"
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: dict[str, Any] = json.loads(out.read_text())
    results["_markdown"] = proc.stdout
    return results


def test_every_request_served_with_fewer_starts_than_requests(quick: dict[str, Any]) -> None:
    [run] = quick["runs"]
    assert (run["scenario"], run["code"]) == ("alt-2x2", "new")
    assert run["requests"] == 2 * quick["settings"]["requests"]
    assert run["statuses"] == {"200": run["requests"]}, run
    assert run["errors"] == {} and run["failed"] == 0 and not run["timed_out"], run
    assert all(r["status"] == 200 for r in run["rows"])
    # Requests are grouped by model: not one start per request, and never below the ideal.
    assert run["min_loads"] <= run["starts"] < run["requests"], run
    assert run["spawns"] == run["starts"]  # the model processes agree with start_count
    assert run["wall_s"] >= run["ideal_s"] > 0
    assert 0 <= run["wait_p50_s"] <= run["wait_p95_s"] <= run["wait_max_s"]
    assert run["server_wait_mean_s"] > 0


def test_report_and_no_process_left(quick: dict[str, Any]) -> None:
    assert "| alt-2x2 | new | 8 | 8 | 0 (0%) |" in quick["_markdown"]
    assert quick["imports_from"]["new"].endswith("__init__.py")
    check_no_leftovers(quick)
