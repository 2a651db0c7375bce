"""Memory in the CLI (issue 18): ``llm-manager estimate MODEL[:SCHEME]`` offline (declared,
GGUF estimate, measured peaks read from the data directory's database, the estimate's error),
``check-config``'s line per scheme with ``auto`` devices, and the memory lines of ``info`` and
the memory column of ``models`` against a real manager that measured a real process."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from llm_manager.cli import memory
from llm_manager.config import load_file
from llm_manager.engines import gguf_estimate
from llm_manager.models.footprint import definition_of
from llm_manager.store.db import Database
from llm_manager.store.footprints import Footprint, FootprintStore
from tests.conftest import fake_command
from tests.test_server_process import Manager, launch, stop_cleanly, write_config

CLI = [sys.executable, "-m", "llm_manager"]


def run_cli(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MANAGER_")}
    env["COLUMNS"] = str(columns)
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


def llama(model: Path, *flags: str) -> list[str]:
    return ["llm-manager", "llama-server", "-m", str(model), "--port", "{port}", "-a", "{name}",
            "-t", "2", "-c", "512", *flags]  # fmt: skip


def config(tmp_path: Path, tiny: Any) -> Path:
    models = {
        "tiny": {
            "aliases": ["t"],
            "schemes": {
                "cpu": {"devices": {"cpu": "auto"}, "command": llama(tiny.chat)},
                "fixed": {"devices": {"cpu": 512}, "command": llama(tiny.chat, "-np", "2")},
            },
        },
        "other": {"schemes": {"cpu": {"devices": {"cpu": "auto"}, "command": fake_command()}}},
    }
    return write_config(tmp_path, models)


def estimate_of(path: Path, model: str, scheme: str) -> int:
    """The host estimate of a scheme, as the estimator computes it (not through the CLI)."""
    loaded = load_file(path)
    found = gguf_estimate.estimate_for_scheme(
        loaded.config.models[model].schemes[scheme],
        name=model,
        data_dir=tmp_data(path),
        base_dir=path.parent,
    )
    assert found is not None
    return found.host_mib


def tmp_data(path: Path) -> Path:
    return Path(yaml.safe_load(path.read_text())["server"]["data_dir"])


def plus_margin(mib: int) -> int:
    return mib + math.ceil(mib * 10 / 100)  # server.memory_margin's default, 10%


def lines_of(out: str, head: str) -> list[str]:
    """The lines of one scheme's block (its head line, then the indented ones)."""
    found: list[str] = []
    for line in out.splitlines():
        if line.startswith(head):
            found = [line]
        elif found and line.startswith("  "):
            found.append(line)
        elif found:
            break
    return found


def test_estimate_of_a_llama_scheme_without_measurements(tmp_path: Path, tiny_models: Any) -> None:
    path = config(tmp_path, tiny_models)
    result = run_cli("estimate", "tiny", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    mib = estimate_of(path, "tiny", "cpu")
    assert 40 < mib < 200  # the bundled engine's baseline and a tiny model
    block = lines_of(result.stdout, "tiny:cpu ")
    scheme = load_file(path).config.models["tiny"].schemes["cpu"]
    assert block[0] == f"tiny:cpu (definition {definition_of(scheme)})"
    assert block[1] == (
        f"  cpu: declared auto, estimate {mib} MiB, not measured, "
        f"a start plans {plus_margin(mib)} MiB (estimate + 10%)"
    )
    assert block[2].startswith("  parts (MiB): weights host ")
    assert "overhead 59.0" in block[2]  # the bundled engine's baseline
    assert block[3].startswith("  notes: flash attention auto read as on")
    # Both schemes without a name after the model; a declared number is planned as written.
    fixed = lines_of(result.stdout, "tiny:fixed ")
    assert fixed[1].startswith("  cpu: declared 512 MiB, estimate ")
    assert fixed[1].endswith("not measured, a start plans 512 MiB (as declared)")
    # One scheme, by alias.
    one = run_cli("estimate", "t:fixed", "--config", str(path))
    assert one.returncode == 0 and one.stdout.startswith("tiny:fixed ")
    assert "tiny:cpu" not in one.stdout
    # Not a llama.cpp command: no estimate, and auto cannot be planned.
    other = run_cli("estimate", "other", "--config", str(path))
    assert other.returncode == 0, other.stderr
    assert other.stdout.splitlines()[1:] == [
        "  cpu: declared auto, estimate -, not measured, a start is refused: nothing "
        "measured, no estimate; write the MiB it needs",
        "  no estimate: not a llama.cpp command",
    ]


def save(data_dir: Path, *rows: Footprint) -> None:
    """Rows written with the manager's own store, then committed and closed."""
    db = Database(data_dir / "llm-manager.db")
    assert db.open()
    store = FootprintStore(db)
    for fp in rows:
        store.save(fp)
    assert db.flush()
    db.close()


def test_estimate_with_measurements_prints_peaks_and_error(
    tmp_path: Path, tiny_models: Any
) -> None:
    path = config(tmp_path, tiny_models)
    loaded = load_file(path)
    schemes = loaded.config.models["tiny"].schemes
    mib = estimate_of(path, "tiny", "cpu")
    peak = mib - 4
    now = time.time()
    save(
        tmp_data(path),
        Footprint("tiny", "cpu", "cpu", definition_of(schemes["cpu"]), peak - 2, peak, 3, now),
        # Another definition of "fixed" (its command changed since): not this one's figures.
        Footprint("tiny", "fixed", "cpu", "0123456789abcdef", 900, 950, 2, now),
    )
    result = run_cli("estimate", "tiny", "--config", str(path))
    assert result.returncode == 0, result.stderr
    error = (mib - peak) / peak * 100
    block = lines_of(result.stdout, "tiny:cpu ")
    assert block[1] == (
        f"  cpu: declared auto, estimate {mib} MiB, measured peak {peak} MiB "
        f"(load {peak - 2}, serve {peak}; 3 runs), estimate error {error:+.1f}%, "
        f"a start plans {plus_margin(peak)} MiB (measured peak + 10%)"
    )
    fixed = lines_of(result.stdout, "tiny:fixed ")
    assert "not measured" in fixed[1] and "950" not in fixed[1]
    assert fixed[-1] == (
        "  2 runs measured under an earlier definition of this scheme: ignored "
        "(the scheme changed since)"
    )
    # The same for scripts.
    data = json.loads(run_cli("estimate", "tiny:cpu", "--config", str(path), "--json").stdout)
    (plan,) = data
    assert plan["model"] == "tiny" and plan["scheme"] == "cpu"
    assert plan["devices"]["cpu"] == {
        "declared": "auto",
        "planned": plus_margin(peak),
        "source": "measured",
        "estimate": mib,
        "load_peak": peak - 2,
        "serve_peak": peak,
        "runs": 3,
        "error_percent": round(error, 1),
    }
    assert 59.0 <= plan["parts"]["overhead"] < 60 and plan["no_estimate"] is None
    # check-config says what a start would plan with, and passes.
    checked = run_cli("check-config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr == ""
    assert f"{path}: models.tiny.schemes.cpu.devices: auto memory: a start would plan cpu " in (
        checked.stdout
    )
    assert f"cpu {plus_margin(peak)} MiB (measured {peak} + 10%)" in checked.stdout
    assert (
        f"{path}: models.other.schemes.cpu.devices: auto memory: nothing measured, no estimate "
        "(not a llama.cpp command): a start will be refused until you write a number"
    ) in checked.stdout.splitlines()
    assert "models.tiny.schemes.fixed" not in checked.stdout  # no auto device there


def test_check_config_plans_auto_from_the_estimate_without_a_database(
    tmp_path: Path, tiny_models: Any
) -> None:
    path = config(tmp_path, tiny_models)
    assert not (tmp_data(path) / "llm-manager.db").exists()
    checked = run_cli("check-config", str(path))
    assert checked.returncode == 0, checked.stderr
    mib = estimate_of(path, "tiny", "cpu")
    assert (
        f"{path}: models.tiny.schemes.cpu.devices: auto memory: a start would plan cpu "
        f"{plus_margin(mib)} MiB (estimate {mib} + 10%)"
    ) in checked.stdout.splitlines()
    assert checked.stdout.splitlines()[0] == f"{path}: valid (2 model(s): other, tiny)"
    assert not (tmp_data(path) / "llm-manager.db").exists()  # read-only: nothing created


def test_estimate_of_an_unknown_model_or_scheme(tmp_path: Path, tiny_models: Any) -> None:
    path = config(tmp_path, tiny_models)
    result = run_cli("estimate", "nope", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: no model 'nope' in {path} (models: other, tiny)\n"
    result = run_cli("estimate", "tiny:gpu", "--config", str(path))
    assert result.returncode == 2
    assert "error: model 'tiny' has no scheme 'gpu' (its schemes: cpu, fixed)" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: {m: {schemes: {cpu: {comand: x}}}}\n")
    result = run_cli("estimate", "m", "--config", str(bad))
    assert result.returncode == 1 and "unknown key" in result.stderr


def test_an_unreadable_database_is_said_and_measurements_left_out(
    tmp_path: Path, tiny_models: Any
) -> None:
    path = config(tmp_path, tiny_models)
    tmp_data(path).mkdir(parents=True)
    (tmp_data(path) / "llm-manager.db").write_bytes(b"not a database at all" * 100)
    result = run_cli("estimate", "tiny:cpu", "--config", str(path))
    assert result.returncode == 0
    assert result.stderr.startswith("warning: cannot read the measurements in ")
    assert "not measured" in result.stdout


# --- info and models against a real manager -------------------------------------------------


def rows(table: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("│").split("│")]
        for line in table.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture
def manager(tmp_path: Path, spawn_log: Path) -> Iterator[Manager]:
    command = fake_command("--spawn-log", str(spawn_log))
    models = {
        "tight": {"schemes": {"cpu": {"devices": {"cpu": 1}, "command": command}}},
        "roomy": {"schemes": {"cpu": {"devices": {"cpu": 4096}, "command": command}}},
        "plain": {"schemes": {"any": {"command": command}}},
    }
    m = launch(write_config(tmp_path, models), tmp_path)
    try:
        for name in models:
            assert m.post(f"/api/models/{name}/start")["success"]
        yield m
    finally:
        stop_cleanly(m)


def measured(m: Manager, name: str, key: str) -> dict[str, Any]:
    """The model's memory once a first reading came (the manager reads every 0.5-1 s)."""
    deadline = time.monotonic() + 15
    while True:
        mem = m.get(f"/api/models/{name}/info")["model"]["memory"]
        part = mem["devices"].get(key) if key != "host" else mem["host"]
        if part and part["load_peak"] is not None and part["now"] is not None:
            return dict(mem)
        assert time.monotonic() < deadline, mem
        time.sleep(0.1)


def test_info_and_models_show_measured_memory(manager: Manager) -> None:
    tight = measured(manager, "tight", "cpu")
    roomy = measured(manager, "roomy", "cpu")
    measured(manager, "plain", "host")
    out = run_cli("info", "tight", "--url", manager.url, columns=200)
    assert out.returncode == 0, out.stderr
    fields = [(r[0], r[1]) for r in rows(out.stdout)]
    memory_rows = [(k, v) for k, v in fields if k.startswith("memory")]
    line = dict(memory_rows)["memory cpu"]
    assert line.startswith("declared 1 MiB, peak ")
    found = re.search(r"peak (\d+) MiB \(load (\d+|-), serve (\d+|-); 1 run\)", line)
    assert found is not None, line
    peak = int(found[1])
    assert peak >= tight["devices"]["cpu"]["load_peak"] > 1  # a Python process: MiB, not 1
    assert re.search(r", now \d+ MiB, planned 1 MiB \(declared\)", line), line
    # The warning: a row of its own, in the words of the API.
    warnings = [v for k, v in memory_rows if k == "memory warning"]
    assert len(warnings) == 1
    assert re.fullmatch(r"cpu: measured \d+ MiB, above the 1 MiB declared", warnings[0])
    assert "{'scheme'" not in out.stdout  # not the raw dict

    plain = run_cli("info", "plain", "--url", manager.url)
    plain_rows = dict((r[0], r[1]) for r in rows(plain.stdout))
    assert re.match(r"peak \d+ MiB \(load \d+, serve -; 1 run\), now \d+ MiB$",
                    plain_rows["memory system"])  # fmt: skip
    assert "memory cpu" not in plain_rows and "memory warning" not in plain_rows

    table = run_cli("models", "--url", manager.url, columns=200)
    header = next(line for line in table.stdout.splitlines() if line.startswith("┃"))
    columns = [c.strip() for c in header.strip("┃").split("┃")]
    cells = {r[0]: r[columns.index("memory")] for r in rows(table.stdout)}
    assert re.fullmatch(r"cpu \d+/1! MiB", cells["tight"]), cells
    roomy_peak = int(cells["roomy"].split()[1].split("/")[0])
    assert roomy_peak >= roomy["devices"]["cpu"]["load_peak"]
    assert cells["roomy"] == f"cpu {roomy_peak}/4096 MiB"
    assert re.fullmatch(r"system \d+ MiB", cells["plain"]), cells
    # At 80 columns the memory column is left out first: names stay whole.
    narrow = run_cli("models", "--url", manager.url, columns=80)
    assert "memory" not in narrow.stdout and "tight" in narrow.stdout
    # --json keeps the API's object.
    data = json.loads(run_cli("info", "tight", "--url", manager.url, "--json").stdout)
    assert data["model"]["memory"]["devices"]["cpu"]["declared"] == 1


# --- the words, from API objects ------------------------------------------------------------


def test_short_and_info_rows_of_api_objects() -> None:
    def device(**kw: Any) -> dict[str, Any]:
        base = {"declared": "auto", "planned": None, "source": "none", "booked": None,
                "now": None, "load_peak": None, "serve_peak": None, "runs": 0, "estimate": None}  # fmt: skip
        return {**base, **kw}

    auto: dict[str, Any] = {
        "scheme": "s",
        "devices": {
            "cpu": device(planned=509, source="estimate", estimate=462),
            "cuda:0": device(declared=4096, planned=4096, source="declared", load_peak=3000),
        },
        "host": None,
        "warnings": [],
        "estimate_error": None,
    }
    assert memory.short(auto) == "cpu auto→estimate 509, cuda:0 3000/4096 MiB"
    assert memory.info_rows(auto) == [
        ("memory cpu", "declared auto, not measured, planned 509 MiB (estimate), "
         "estimate 462 MiB", None),
        ("memory cuda:0", "declared 4096 MiB, peak 3000 MiB (load 3000, serve -; 0 runs), "
         "planned 4096 MiB (declared)", None),
    ]  # fmt: skip
    nothing = {**auto, "devices": {"cpu": device()}, "estimate_error": "no GGUF"}
    assert memory.short(nothing) == "cpu auto→none"
    assert memory.info_rows(nothing)[-1] == ("memory estimate", "failed: no GGUF", None)
    assert memory.short({"scheme": None}) == "-"
    assert memory.info_rows(None) == [("memory", "-", None)]


def test_estimate_against_a_real_run_of_the_bundled_engine(
    tmp_path: Path, tiny_models: Any
) -> None:
    """The whole loop: the manager starts the bundled engine on an auto scheme (planned from
    the estimate), measures it loading and serving, keeps the peaks in its database; after
    it stopped, ``estimate`` reads them and says how far off the estimate was."""
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    path = config(tmp_path, tiny_models)
    mib = estimate_of(path, "tiny", "cpu")
    m = launch(path, tmp_path)
    try:
        assert m.post("/api/models/tiny/start")["success"]
        mem = m.get("/api/models/tiny/info")["model"]["memory"]
        assert mem["devices"]["cpu"]["source"] in ("estimate", "measured")
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 4}).encode()  # fmt: skip
        req = urllib.request.Request(
            m.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        deadline = time.monotonic() + 15
        while (
            m.get("/api/models/tiny/info")["model"]["memory"]["devices"]["cpu"]["serve_peak"]
            is None
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        stop_cleanly(m)
    result = run_cli("estimate", "tiny:cpu", "--config", str(path), "--json")
    assert result.returncode == 0, result.stderr
    (plan,) = json.loads(result.stdout)
    cpu = plan["devices"]["cpu"]
    # Serving was measured; loading may have ended before the first reading (0.5 s apart).
    assert cpu["runs"] == 1 and cpu["serve_peak"]
    peak = max(v for v in (cpu["load_peak"], cpu["serve_peak"]) if v is not None)
    load = "-" if cpu["load_peak"] is None else cpu["load_peak"]
    assert cpu["estimate"] == mib and cpu["source"] == "measured"
    assert cpu["planned"] == plus_margin(peak)
    assert cpu["error_percent"] == round((mib - peak) / peak * 100, 1)
    assert abs(cpu["error_percent"]) < 25  # docs/memory.md: within a few percent here
    text = run_cli("estimate", "tiny:cpu", "--config", str(path)).stdout
    assert f"measured peak {peak} MiB (load {load}, serve {cpu['serve_peak']}; 1 run)" in text
    assert f"estimate error {cpu['error_percent']:+.1f}%" in text
