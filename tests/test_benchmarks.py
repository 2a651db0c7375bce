"""Smoke test of the benchmark harness: ``benchmarks/run.py --quick`` in a subprocess, checked
through the JSON it writes.

LiteLLM is left out (``--litellm none``): it alone takes 15-20 s to start. nginx, wrk and Go
(the ``go-proxy`` target, benchmarks/goproxy, built by the harness) are used when installed; a
second, shorter run forces the fallbacks (aiohttp.web backends, the aiohttp load generator, no
Go proxy) so that they are covered on every machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import alive

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "benchmarks" / "run.py"
LLAMA = all(importlib.util.find_spec(m) is not None for m in ("xllamacpp", "gguf"))
GO = shutil.which("go") or shutil.which("/usr/lib/go/bin/go")  # as benchmarks/procs.py finds it
GOALS = 19  # issue 7's 11, issue 19's 8
BODIES = {"bodies-small", "bodies-64KiB", "bodies-1MiB"}


def run_harness(out: Path, *options: str, timeout: float) -> dict[str, Any]:
    """Run the harness; on a timeout stop it with SIGTERM so that it tears down its targets."""
    argv = [sys.executable, str(HARNESS), "--quick", "--litellm", "none", "--json", str(out)]
    proc = subprocess.Popen(
        [*argv, *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=25)
        proc.kill()
        proc.communicate()
        pytest.fail(f"the quick benchmark ran past {timeout} s")
    assert proc.returncode == 0, stderr[-4000:]
    results: dict[str, Any] = json.loads(out.read_text())
    results["_markdown"] = stdout
    return results


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # 150 s: a first `go build` of the Go proxy, on an empty build cache, takes 15-60 s
    return run_harness(tmp_path_factory.mktemp("bench") / "quick.json", timeout=150)


def all_runs(results: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(scenario, target or variant, run) for every timed run."""
    out = []
    for key, scenario in results["scenarios"].items():
        for target, runs in scenario["runs"].items():
            out += [(key, target, r) for r in runs]
    for key in ("aliases", "bad_input"):
        for name, runs in results.get(key, {}).get("runs", {}).items():
            out += [(key, f"llm-manager ({name})", r) for r in runs]
    return out


def check_scenarios(results: dict[str, Any], expected: set[str]) -> None:
    assert set(results["scenarios"]) == expected
    for key, scenario in results["scenarios"].items():
        alias = {"llm-manager (alias)"} if key.startswith("bodies") else set()
        assert set(scenario["median"]) == set(results["targets"]) | alias, key
        for target, m in scenario["median"].items():
            assert m["failed_runs"] == 0, (key, target)
            assert m["rps"] > 0, (key, target)
            assert m["p50_ms"] > 0, (key, target)
            if target != "direct":
                assert m["gateway_cpu_ms_per_request"] > 0, (key, target)
            if key.startswith(("sse", "llama-stream")):
                assert m["events_per_answer"] >= 3, (key, target)
                if target != "direct":
                    assert m["gateway_cpu_us_per_event"] > 0, (key, target)


def check_manager_answers(results: dict[str, Any]) -> None:
    """Every well-formed request through LLM-Manager got a 200 and nothing failed."""
    runs = [
        (k, t, r)
        for k, t, r in all_runs(results)
        if t.startswith("llm-manager") and "malformed burst alone" not in t
    ]
    assert runs
    for key, target, r in runs:
        assert "error" not in r, (key, target, r)
        assert set(r["statuses"]) == {"200"}, (key, target, r["statuses"])
        assert r["errors"] == 0 and r["retries"] == 0, (key, target, r)


def check_malformed(results: dict[str, Any]) -> None:
    seen = results["bad_input"]["malformed_statuses"]
    assert len(seen) == 7
    for kind, statuses in seen.items():
        assert sum(statuses.values()) > 0, kind
        assert all(400 <= int(code) < 500 for code in statuses), (kind, statuses)


def check_no_leftovers(results: dict[str, Any]) -> None:
    workdir = results["workdir"]
    assert not Path(workdir).exists()
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(workdir in part for part in proc.info["cmdline"] or []):
                left.append(proc.info)
    assert not left, left


def test_quick_run_measures_every_present_target(quick: dict[str, Any]) -> None:
    """Every group's scenarios; the bodies group (small, 64 KiB, 1 MiB) also through
    LLM-Manager by an alias, whose every answer is a 200 (check_manager_answers)."""
    expected = {"json-c1", "json-c8", "json-c64", "sse-c1", "sse-c16", *BODIES}
    if LLAMA:
        expected |= {"llama-stream-c1", "llama-stream-c16", "llama-json-c8"}
    assert {"direct", "minimal-relay", "llm-manager"} <= set(quick["targets"])
    assert "litellm" not in quick["targets"]
    check_scenarios(quick, expected)
    for scenario in ("json-c8", "sse-c16"):
        direct = quick["scenarios"][scenario]["median"]["direct"]
        assert "gateway_cpu_ms_per_request" not in direct  # no gateway: no gateway CPU


def test_go_reverse_proxy_is_a_target_everywhere_nginx_is(quick: dict[str, Any]) -> None:
    """The Go ReverseProxy (benchmarks/goproxy) is built and measured in every scenario,
    its own process's CPU counted, and issue 19's goals against it are measured."""
    if GO is None:
        assert "go-proxy" not in quick["targets"]
        assert any(n.startswith("go not found") for n in quick["notes"])
        pytest.skip("go is not installed (Debian: apt-get install golang-go): no Go proxy target")
    assert "go-proxy" in quick["targets"], quick["notes"]
    assert quick["machine"]["go"].startswith("go")
    for key, scenario in quick["scenarios"].items():
        m = scenario["median"]["go-proxy"]
        assert m["failed_runs"] == 0 and m["gateway_cpu_ms_per_request"] > 0, key
        if not key.startswith("llama"):  # llama.cpp closes connections: the proxy answers 502
            assert m["non_200"] == 0 and m["errors"] == 0, (key, m["statuses"])
    against_go = [g for g in quick["goals"] if g["issue"] == 19 and "Go" in g["goal"]]
    assert len(against_go) == 4
    assert all(isinstance(g["value"], float) for g in against_go), against_go
    markdown = quick["_markdown"]
    assert "| go-proxy |" in markdown and "CPU ÷ Go" in markdown


def test_llm_manager_answers_200_and_malformed_requests_get_4xx(quick: dict[str, Any]) -> None:
    check_manager_answers(quick)
    check_malformed(quick)
    for variant in ("without burst", "with malformed burst"):
        assert quick["bad_input"]["median"][variant]["gateway_cpu_ms_per_request"] > 0
    alone = quick["bad_input"]["median"]["malformed burst alone"]
    assert alone["requests"] == 7 * quick["bad_input"]["per_kind_per_run"]


def test_aliases_memory_and_cold_start(quick: dict[str, Any]) -> None:
    aliases = quick["aliases"]["median"]
    assert list(aliases) == ["fast", "fast-a000", "tail-a099", "tail"]
    assert all(m["rps"] > 0 and m["gateway_cpu_ms_per_request"] > 0 for m in aliases.values())
    points = quick["rss"]
    assert [p["point"].split()[0] for p in points] == ["start", "middle", "end", "after"]
    assert all(p["VmRSS"] > 0 and p["VmHWM"] >= p["VmRSS"] for p in points)
    assert points[0]["requests"] == 0
    assert points[-1]["requests"] > points[2]["requests"] > points[1]["requests"] > 0
    if LLAMA:
        cold = quick["cold_start"]["median"]
        assert cold["engine_start_to_healthy_ms"] > 0
        assert cold["manager_cold_ttfb_ms"] > 0
        assert cold["engine_healthy_ms"] > 0


def test_goals_are_measured_not_assumed(quick: dict[str, Any]) -> None:
    goals = quick["goals"]
    assert len(goals) == GOALS
    for goal in goals:
        if goal["value"] is None:
            assert goal["met"] is None and goal["measured"] == "not measured"
        else:
            assert isinstance(goal["met"], bool)
            assert isinstance(goal["value"], int | float)
            assert goal["measured"].split()[0].lstrip("-").replace(".", "").isdigit()
    measured = {g["goal"] for g in goals if g["value"] is not None}
    assert any("8 clients" in g for g in measured)
    if "nginx" not in quick["targets"]:
        assert all(g["value"] is None for g in goals if "nginx" in g["goal"])
    if "go-proxy" not in quick["targets"]:
        assert all(g["value"] is None for g in goals if "Go" in g["goal"])
    assert [g["issue"] for g in goals] == [7] * 11 + [19] * 8
    markdown = quick["_markdown"]
    assert "## Results" in markdown and "### Goals" in markdown
    assert "| llm-manager |" in markdown


def test_no_process_or_folder_left_behind(quick: dict[str, Any]) -> None:
    check_no_leftovers(quick)


def test_fallbacks_without_nginx_and_wrk(tmp_path: Path) -> None:
    results = run_harness(
        tmp_path / "fallback.json",
        *("--only", "json,bad-input", "--nginx", "none", "--wrk", "none", "--go", "none"),
        timeout=60,
    )
    assert results["load_generator"] == "aiohttp"
    assert results["targets"] == ["direct", "minimal-relay", "llm-manager"]
    assert any(n.startswith("go not found") for n in results["notes"])
    check_scenarios(results, {"json-c1", "json-c8", "json-c64"})
    check_manager_answers(results)
    check_malformed(results)
    check_no_leftovers(results)


@pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("wrk"),
    reason="benchmarks/ab.py needs nginx and wrk",
)
def test_ab_compares_two_checkouts_side_by_side() -> None:
    """benchmarks/ab.py, one short round: both managers answer every request with 200 and
    their CPU per request is measured (a positive figure for each side)."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--a", "src", "--b", "src"]
    argv += ["--rounds", "1", "--seconds", "1", "--go", "none"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round 1")]
    assert len(rounds) == 2 and all(line.endswith(" 0 not 200") for line in rounds)
    means = {
        line.split(":")[0].strip(): float(line.split("mean ")[1].split()[0])
        for line in proc.stdout.splitlines()
        if " mean " in line
    }
    assert set(means) == {"A", "B"} and all(value > 0 for value in means.values())
    assert "B / A: " in proc.stdout


@pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()) or not shutil.which("wrk"),
    reason="benchmarks/ab.py needs nginx and wrk",
)
def test_ab_stopped_by_sigterm_leaves_no_process() -> None:
    """SIGTERM to benchmarks/ab.py while its managers serve: it stops every process it
    started (managers, their engines and reapers) and its work folder is gone."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "ab.py"), "--a", "src", "--b", "src"]
    argv += ["--rounds", "3", "--seconds", "3", "--go", "none"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()  # a round's line: both sides are serving
        assert first.startswith("round 1"), first
        harness = psutil.Process(proc.pid)
        started = harness.children(recursive=True)
        assert len([p for p in started if "llm_manager" in " ".join(p.cmdline())]) >= 2
        workdirs = {
            part.split("/A/")[0]
            for p in started
            for part in p.cmdline()
            if "/llm-manager-ab-" in part and "/A/" in part
        }
        assert len(workdirs) == 1, workdirs
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr.decode()[-2000:]
    assert "interrupted" in stderr.decode()
    _, waiting = psutil.wait_procs(started, timeout=5)
    left = [p for p in waiting if alive(p.pid)]  # an exited wrk may wait to be reaped by init
    for proc_left in left:
        with contextlib.suppress(psutil.Error):
            proc_left.kill()
    assert not left, [p.pid for p in left]
    assert not Path(workdirs.pop()).exists()


WRK_HARNESS = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import load
request = load.Request(sys.argv[3], b"{}", {})
script = load.wrk_script(__import__("pathlib").Path(sys.argv[2]), request)
asyncio.run(load.wrk(sys.argv[4], script, sys.argv[3], 1, 60))
"""


@pytest.mark.skipif(not shutil.which("wrk"), reason="needs wrk")
def test_wrk_dies_with_a_harness_killed_outright(tmp_path: Path) -> None:
    """A harness that ends without tearing down (SIGKILL here; an interrupt that lands while
    wrk is being spawned, in effect) leaves no wrk running: wrk dies with its parent."""
    import socket

    with socket.socket() as listener:  # a port that accepts and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/"
        wrk = shutil.which("wrk")
        argv = [sys.executable, "-c", WRK_HARNESS, str(ROOT / "benchmarks"), str(tmp_path)]
        harness = subprocess.Popen([*argv, url, str(wrk)], cwd=ROOT)
        try:
            parent = psutil.Process(harness.pid)
            found: list[psutil.Process] = []
            for _ in range(100):
                found = [p for p in parent.children() if p.name() == "wrk"]
                if found:
                    break
                time.sleep(0.05)
            assert found, "wrk did not start"
            harness.kill()
            harness.wait(10)
            _, waiting = psutil.wait_procs(found, timeout=5)
            assert not [p for p in waiting if alive(p.pid)]
        finally:
            if harness.poll() is None:
                harness.kill()
                harness.wait(10)


@pytest.mark.skipif(
    not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists())
    or not shutil.which("wrk")
    or not LLAMA,
    reason="benchmarks/stream_cost.py needs nginx, wrk and the llama extra",
)
def test_stream_cost_splits_a_stream_into_its_parts(tmp_path: Path) -> None:
    """benchmarks/stream_cost.py, one short round of two answer lengths: every answer is
    200 through the manager, nginx and the uvloop pipe, longer answers carry more events and
    cost more, and the summary gives each target's cost per stream and per event."""
    out = tmp_path / "cost.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "stream_cost.py"), "--tokens", "4,32"]
    argv += ["--rounds", "1", "--seconds", "1", "--go", "none", "--json", str(out)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round 1")]
    assert len(rounds) == 6 and all(" answers, 0 not 200, " in line for line in rounds)
    result = json.loads(out.read_text())
    events = {int(n): count for n, count in result["events"].items()}
    assert 0 < events[4] < events[32]
    assert set(result["runs"]) == {"llm-manager", "nginx", "uvloop-pipe"}
    for per_tokens in result["runs"].values():
        (short,), (long,) = per_tokens["4"], per_tokens["32"]
        assert all(value >= 0 for value in (*short, *long))
        assert sum(long) > sum(short) > 0  # a longer answer costs the gateway more
    for name in ("llm-manager", "nginx", "uvloop-pipe"):
        assert any(line.startswith(f"| {name} | all | ") for line in proc.stdout.splitlines())
