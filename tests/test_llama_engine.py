"""The bundled llama.cpp engine (``llm-manager llama-server``) with real tiny GGUF models.

Each test talks to a real llama.cpp HTTP server (from the ``xllamacpp`` wheel) started as a
child process by ``python -m llm_manager.engines.llama_server``; the models are random-weight
GGUF files written by :mod:`tests.models.gguf_factory`, so nothing is downloaded.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
pytest.importorskip("gguf", reason="needs the gguf package to write test models")

from tests.models.gguf_factory import EMBEDDING_DIM, TinyModels  # noqa: E402

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code
    except OSError:
        return None


def start_engine(model: Path, log: Path, *flags: str) -> Engine:
    """Start the engine as a child process and wait until /health answers 200."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llm_manager.engines.llama_server",
        "-m",
        str(model),
        "--port",
        str(port),
        "-t",
        "2",
        *flags,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    engine = Engine(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _health(engine.url) == 200:
            return engine
        time.sleep(0.05)
    engine.stop()
    raise AssertionError(f"engine did not become healthy:\n{engine.log_text()[-3000:]}")


@pytest.fixture(scope="module")
def chat_engine(
    tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("chat") / "engine.log"
    engine = start_engine(tiny_models.chat, log, "-a", "tiny-chat,tiny", "-c", "512")
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def embedding_engine(
    tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("embedding") / "engine.log"
    engine = start_engine(tiny_models.embedding, log, "--embedding", "--pooling", "mean")
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def rerank_engine(
    tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("rerank") / "engine.log"
    engine = start_engine(tiny_models.reranker, log, "--reranking", "-a", "tiny-rerank")
    yield engine
    engine.stop()


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def post_json(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


CHAT_BODY: dict[str, Any] = {
    "model": "tiny-chat",
    "messages": [{"role": "user", "content": "hello there"}],
    "max_tokens": 8,
    "temperature": 0,
}


async def test_models_lists_alias(chat_engine: Engine, http: aiohttp.ClientSession) -> None:
    async with http.get(chat_engine.url + "/v1/models") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["object"] == "list"
    entry = data["data"][0]
    # llama.cpp keeps aliases in a std::set: sorted, and the id is the first of them.
    assert entry["aliases"] == ["tiny", "tiny-chat"]
    assert entry["id"] == "tiny"


async def test_chat_completion(chat_engine: Engine, http: aiohttp.ClientSession) -> None:
    status, data = await post_json(http, chat_engine.url + "/v1/chat/completions", CHAT_BODY)
    assert status == 200, data
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    timings = data["timings"]
    assert timings["predicted_n"] == usage["completion_tokens"]
    assert timings["prompt_n"] + timings["cache_n"] == usage["prompt_tokens"]


async def test_chat_prompt_cache_reported(chat_engine: Engine, http: aiohttp.ClientSession) -> None:
    body = {**CHAT_BODY, "messages": [{"role": "user", "content": "the same prompt again"}]}
    _, first = await post_json(http, chat_engine.url + "/v1/chat/completions", body)
    _, second = await post_json(http, chat_engine.url + "/v1/chat/completions", body)
    assert second["timings"]["cache_n"] > 0
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == second["timings"]["cache_n"]


async def _stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[str]:
    payloads: list[str] = []
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if line:
                assert line.startswith("data: "), line
                payloads.append(line[len("data: ") :])
    return payloads


async def test_chat_stream(chat_engine: Engine, http: aiohttp.ClientSession) -> None:
    body = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    payloads = await _stream(http, chat_engine.url + "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) >= 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert isinstance(text, str)
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1
    # With include_usage the last chunk has no choices, and carries usage and timings.
    last = chunks[-1]
    assert last["choices"] == []
    assert 1 <= last["usage"]["completion_tokens"] <= 8
    assert last["timings"]["predicted_n"] == last["usage"]["completion_tokens"]
    assert {"prompt_n", "cache_n"} <= set(last["timings"])


async def test_chat_stream_without_usage_has_timings(
    chat_engine: Engine, http: aiohttp.ClientSession
) -> None:
    body = {**CHAT_BODY, "stream": True}
    payloads = await _stream(http, chat_engine.url + "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    last = json.loads(payloads[-2])
    # No usage without stream_options.include_usage; the finish chunk carries timings.
    assert "usage" not in last
    assert last["choices"][0]["finish_reason"] in ("length", "stop")
    assert {"prompt_n", "predicted_n", "cache_n"} <= set(last["timings"])


async def test_completions(chat_engine: Engine, http: aiohttp.ClientSession) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    status, data = await post_json(http, chat_engine.url + "/v1/completions", body)
    assert status == 200, data
    assert data["object"] == "text_completion"
    assert isinstance(data["choices"][0]["text"], str)
    assert 1 <= data["usage"]["completion_tokens"] <= 8
    assert data["timings"]["predicted_n"] == data["usage"]["completion_tokens"]


async def test_embeddings(embedding_engine: Engine, http: aiohttp.ClientSession) -> None:
    body = {"model": "x", "input": ["hello world", "what is a panda"]}
    status, data = await post_json(http, embedding_engine.url + "/v1/embeddings", body)
    assert status == 200, data
    assert data["object"] == "list"
    assert [d["index"] for d in data["data"]] == [0, 1]
    for item in data["data"]:
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == EMBEDDING_DIM
        assert all(isinstance(v, float) for v in item["embedding"])
    assert data["usage"]["prompt_tokens"] > 0


async def test_embedding_engine_refuses_chat(
    embedding_engine: Engine, http: aiohttp.ClientSession
) -> None:
    status, _ = await post_json(http, embedding_engine.url + "/v1/chat/completions", CHAT_BODY)
    assert status >= 400


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
async def test_rerank(rerank_engine: Engine, http: aiohttp.ClientSession, path: str) -> None:
    body = {
        "model": "tiny-rerank",
        "query": "what is a panda",
        "documents": ["hello", "the panda is a bear", "the world"],
    }
    status, data = await post_json(http, rerank_engine.url + path, body)
    assert status == 200, data
    results = data["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    assert all(isinstance(r["relevance_score"], float) for r in results)
    assert data["usage"]["prompt_tokens"] > 0


async def test_api_key(tiny_models: TinyModels, tmp_path: Path) -> None:
    engine = start_engine(tiny_models.chat, tmp_path / "engine.log", "--api-key", "k1,k2")
    try:
        async with aiohttp.ClientSession() as http:
            url = engine.url + "/v1/chat/completions"
            async with http.post(url, json=CHAT_BODY) as resp:
                assert resp.status == 401
            headers = {"Authorization": "Bearer k2"}
            async with http.post(url, json=CHAT_BODY, headers=headers) as resp:
                assert resp.status == 200
            async with http.get(engine.url + "/health") as resp:
                assert resp.status == 200  # /health stays public
    finally:
        engine.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_exits_zero(tiny_models: TinyModels, tmp_path: Path, sig: int) -> None:
    engine = start_engine(tiny_models.chat, tmp_path / "engine.log")
    try:
        # "serving" is printed once stop signals are handled (not in the instant between
        # the model being ready and that, when a signal ends the process by default).
        deadline = time.monotonic() + 10
        while "serving" not in engine.log_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        engine.proc.send_signal(sig)
        assert engine.proc.wait(10) == 0
        assert time.monotonic() - started < 3
        assert "received, exiting" in engine.log_text()
    finally:
        engine.stop()


def test_missing_model_fails_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = subprocess.run(
        [sys.executable, "-m", "llm_manager.engines.llama_server", "-m", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert f"model file not found: {missing}" in result.stderr


def test_busy_port_fails_clearly(tiny_models: TinyModels, chat_engine: Engine) -> None:
    port = chat_engine.url.rsplit(":", 1)[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_manager.engines.llama_server",
            "-m",
            str(tiny_models.chat),
            "--port",
            port,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 1
    assert "couldn't bind HTTP server socket" in result.stderr
    assert "llama.cpp failed to start" in result.stderr


def test_unknown_flag_is_usage_error(tiny_models: TinyModels) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm_manager.engines.llama_server",
            "-m",
            str(tiny_models.chat),
            "--no-such-flag",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def test_missing_xllamacpp_message(
    monkeypatch: pytest.MonkeyPatch, tiny_models: TinyModels, capsys: pytest.CaptureFixture[str]
) -> None:
    from llm_manager.engines import llama_server

    monkeypatch.setitem(sys.modules, "xllamacpp", None)
    assert llama_server.main(["-m", str(tiny_models.chat)]) == 1
    assert "install it with: pip install 'llm-manager[llama]'" in capsys.readouterr().err
