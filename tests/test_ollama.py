"""The Ollama API facade (ollama/): keep_alive parsing and clamping, name:tag mapping, auth
and the web guard on its paths, then the official ``ollama`` client against real llama.cpp
servers (tiny GGUF models): list, ps, show, chat and generate (streamed and not), embed,
keep_alive, and token counts equal to the usage rows of the same requests."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llm_manager.auth import Need, required
from llm_manager.ollama import keepalive, names
from llm_manager.ollama.paths import is_ollama
from tests.conftest import make_config, running_manager, wait_until

ollama = pytest.importorskip("ollama", reason="needs the ollama client (test extra)")


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("0", 0.0),
        ("300", 300.0),
        ("-1", -1.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("-1m", -60.0),
    ],
)
def test_keep_alive_parse(value: object, seconds: float) -> None:
    assert keepalive.parse(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "5 minutes", "m", "1x", True, None, [1], "nan", "inf"])
def test_keep_alive_parse_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        keepalive.parse(value)


def test_keep_alive_clamp() -> None:
    clamp = keepalive.idle_timeout
    assert clamp(0, 0, 3600) == keepalive.UNLOAD  # unload after this request
    assert clamp(0, 60, 3600) == 60  # the floor wins over "unload"
    assert clamp(10, 60, 3600) == 60
    assert clamp(600, 60, 3600) == 600
    assert clamp(86400, 0, 3600) == 3600  # the ceiling
    assert clamp(-1, 0, 3600) == 3600  # "forever" is cut to the ceiling
    assert clamp(-1, 0, 0) == keepalive.FOREVER  # no ceiling: forever allowed
    assert clamp(86400, 0, 0) == 86400


def test_name_candidates() -> None:
    assert names.candidates("llama3") == ["llama3"]
    assert names.candidates("llama3:latest") == ["llama3:latest", "llama3"]
    assert names.candidates("qwen3:8b") == ["qwen3:8b", "qwen3-8b"]
    assert names.candidates(":x") == [":x"]


def test_ollama_paths_need_the_api_key_not_the_admin_key() -> None:
    for path in ("/api/chat", "/api/generate", "/api/embed", "/api/pull", "/api/tags"):
        assert is_ollama(path)
        for method in ("GET", "POST", "DELETE"):
            assert required(method, path, True) is Need.API_KEY
    assert not is_ollama("/api/models")
    assert required("POST", "/api/models/x/start", True) is Need.ADMIN_KEY


def _fake_models() -> dict[str, Any]:
    # Never started by these tests: the command only has to be valid.
    return {"qwen3-8b": {"aliases": ["qwen"], "schemes": {"CPU": {"command": "true {port}"}}}}


async def test_keys_guard_and_unsupported_in_ollama_shape(tmp_path: Path) -> None:
    loaded = make_config(tmp_path, _fake_models(), api_keys=["user-key"], admin_keys=["adm"])
    async with running_manager(loaded) as mgr:
        url = mgr.url
        async with mgr.http.get(url + "/api/tags") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"] == "Bearer"
            assert isinstance((await resp.json())["error"], str)
        user = {"Authorization": "Bearer user-key"}
        async with mgr.http.get(url + "/api/tags", headers=user) as resp:
            assert resp.status == 200
            assert [m["name"] for m in (await resp.json())["models"]] == ["qwen3-8b"]
        # An API key (not the admin key) suffices for the Ollama API's POSTs.
        async with mgr.http.post(url + "/api/show", json={"model": "qwen3:8b"}, headers=user) as r:
            assert r.status == 200
            assert (await r.json())["capabilities"] == ["completion", "tools"]
        async with mgr.http.post(url + "/api/show", json={"model": "nope"}, headers=user) as r:
            assert r.status == 404
            assert "not found" in (await r.json())["error"]
        for path in ("/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy"):
            async with mgr.http.post(url + path, json={"model": "x"}, headers=user) as resp:
                assert resp.status == 501, path
                assert "not supported" in (await resp.json())["error"]
        # A foreign page's POST is refused by the Origin check, in Ollama's shape.
        evil = {**user, "Origin": "http://evil.example"}
        async with mgr.http.post(url + "/api/chat", json={"model": "qwen"}, headers=evil) as r:
            assert r.status == 403
            assert isinstance((await r.json())["error"], str)
        async with mgr.http.get(url + "/api/version") as resp:
            assert resp.status == 401
        async with mgr.http.get(url + "/api/version", headers=user) as resp:
            assert (await resp.json())["version"]
        async with ollama.AsyncClient(host=url, headers=user) as client:
            with pytest.raises(ollama.ResponseError) as info:
                await client.pull("anything")
            assert info.value.status_code == 501
            with pytest.raises(ollama.ResponseError) as info:
                await client.chat(model="qwen", messages=[{"role": "user", "content": "x"}],
                                  keep_alive="5 parsecs")  # fmt: skip
            assert info.value.status_code == 400


# --- the official client against real llama.cpp --------------------------------------------


def _llama_models(tiny: Any) -> dict[str, Any]:
    """test_gateway_llama's models but the reranker (Ollama's API has no reranking)."""
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    from tests.test_gateway_llama import llama_models

    return {name: m for name, m in llama_models(tiny).items() if name != "tiny-rerank"}


async def _rows(mgr: Any) -> list[dict[str, Any]]:
    from tests.test_gateway_llama import rows  # imported here: it needs xllamacpp

    return await rows(mgr)


def _chat(content: str, num_predict: int) -> dict[str, Any]:
    """An Ollama /api/chat body without "stream" (Ollama streams by default)."""
    return {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": content}],
        "options": {"num_predict": num_predict},
    }


async def test_ollama_client_against_real_llama_cpp(tmp_path: Path, tiny_models: Any) -> None:
    loaded = make_config(tmp_path, _llama_models(tiny_models), ollama_keep_alive_max="30s")
    async with running_manager(loaded) as mgr, ollama.AsyncClient(host=mgr.url) as client:
        listed = await client.list()
        assert sorted(m.model for m in listed.models) == ["tiny-chat", "tiny-embed"]
        assert all((m.size or 0) > 0 for m in listed.models)
        assert (await client.ps()).models == []

        shown = await client.show("tiny-chat:latest")
        assert shown.capabilities == ["completion", "tools"]
        assert (await client.show("tiny-embed")).capabilities == ["embedding"]

        messages = [{"role": "user", "content": "Say hello"}]
        opts = {"num_predict": 8, "temperature": 0}
        whole = await client.chat(model="tiny-chat:latest", messages=messages, options=opts)
        assert whole.done and whole.done_reason in ("stop", "length")
        assert whole.message.role == "assistant" and whole.message.content is not None
        assert whole.model == "tiny-chat:latest"
        assert (whole.prompt_eval_count or 0) > 0 and (whole.eval_count or 0) > 0
        assert (whole.total_duration or 0) > 0 and whole.eval_duration is not None

        parts = [
            p
            async for p in await client.chat(
                model="tiny-chat", messages=messages, options=opts, stream=True
            )
        ]
        assert all(not p.done for p in parts[:-1]) and parts[-1].done
        streamed_text = "".join(p.message.content or "" for p in parts)
        assert streamed_text
        last_chat = parts[-1]
        assert (last_chat.eval_count or 0) > 0 and last_chat.done_reason in ("stop", "length")

        generated = await client.generate(model="tiny-chat", prompt="Once", options=opts)
        assert generated.done and generated.response is not None
        gen_parts = [
            p async for p in await client.generate(
                model="tiny-chat", prompt="Once", options=opts, stream=True
            )
        ]  # fmt: skip
        assert gen_parts[-1].done and (gen_parts[-1].eval_count or 0) > 0
        raw = await client.generate(model="tiny-chat", prompt="Once", options=opts, raw=True)
        assert raw.done

        embedded = await client.embed(model="tiny-embed", input=["hello", "world"])
        assert [len(v) for v in embedded.embeddings] == [64, 64]
        old = await client.embeddings(model="tiny-embed", prompt="hello")
        assert len(old.embedding) == 64

        # Token counts in the Ollama answers are the usage rows of the same requests.
        records = await _rows(mgr)
        assert [(r["model"], r["endpoint"], r["status"]) for r in records] == [
            ("tiny-chat", "/v1/chat/completions", 200),
            ("tiny-chat", "/v1/chat/completions", 200),
            ("tiny-chat", "/v1/chat/completions", 200),
            ("tiny-chat", "/v1/chat/completions", 200),
            ("tiny-chat", "/v1/completions", 200),
            ("tiny-embed", "/v1/embeddings", 200),
            ("tiny-embed", "/v1/embeddings", 200),
        ]
        answers = [whole, last_chat, generated, gen_parts[-1], raw]
        for record, answer in zip(records, answers, strict=False):
            assert (record["prompt_tokens"], record["completion_tokens"]) == (
                answer.prompt_eval_count,
                answer.eval_count,
            )
        assert records[1]["stream"] is True and records[0]["stream"] is False
        assert records[5]["prompt_tokens"] == embedded.prompt_eval_count

        # ps: both loaded, with an expiry and the memory their scheme books.
        loaded_now = {m.model: m for m in (await client.ps()).models}
        assert set(loaded_now) == {"tiny-chat", "tiny-embed"}
        assert loaded_now["tiny-chat"].expires_at is not None

        # A keep_alive beyond the ceiling (30 s) is clamped to it.
        await client.chat(model="tiny-chat", messages=messages, options=opts, keep_alive="2h")
        chat_runtime = mgr.supervisor.resolve("tiny-chat")
        assert chat_runtime.idle_timeout == 30
        expires = {m.model: m.expires_at for m in (await client.ps()).models}["tiny-chat"]
        assert expires is not None
        left = (expires - datetime.now(UTC)).total_seconds()
        assert 20 < left <= 31
        # Negative (forever) is cut to the ceiling too.
        await client.generate(model="tiny-chat", prompt="x", options=opts, keep_alive=-1)
        assert chat_runtime.idle_timeout == 30
        # Without keep_alive, the configured idle timeout is back.
        await client.generate(model="tiny-chat", prompt="x", options=opts)
        assert chat_runtime.idle_timeout == 3600

        # keep_alive 0: answered, then unloaded.
        began = time.monotonic()
        answer = await client.chat(model="tiny-chat", messages=messages, options=opts, keep_alive=0)
        assert answer.done
        await wait_until(lambda: chat_runtime.state.value == "stopped", timeout=10)
        assert time.monotonic() - began < 10
        assert [m.model for m in (await client.ps()).models] == ["tiny-embed"]

        # An empty generate loads a model; with keep_alive 0 it unloads it (Ollama's way).
        loaded_answer = await client.generate(model="tiny-chat")
        assert loaded_answer.done_reason == "load"
        assert chat_runtime.state.value == "routing"
        unloaded = await client.generate(model="tiny-chat", keep_alive=0)
        assert unloaded.done_reason == "unload"
        await wait_until(lambda: chat_runtime.state.value == "stopped", timeout=10)

        # An unknown model: Ollama's 404.
        with pytest.raises(ollama.ResponseError) as info:
            await client.chat(model="nope:latest", messages=messages)
        assert info.value.status_code == 404


async def test_ollama_api_off(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, _fake_models(), ollama_api=False)) as mgr:
        status, _ = await mgr.get("/api/tags")
        assert status == 404
        status, _ = await mgr.post("/api/chat", json={"model": "qwen", "messages": []})
        assert status in (404, 405)


async def test_raw_ndjson_stream_and_bad_requests(tmp_path: Path, tiny_models: Any) -> None:
    async with running_manager(make_config(tmp_path, _llama_models(tiny_models))) as mgr:
        async with mgr.http.post(mgr.url + "/api/chat", json=_chat("Hi", 4)) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/x-ndjson"
            lines = (await resp.read()).decode().splitlines()
        objects = [json.loads(line) for line in lines]
        assert objects[-1]["done"] is True and objects[-1]["done_reason"] in ("stop", "length")
        assert all(o["done"] is False for o in objects[:-1])
        for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_count"):
            assert isinstance(objects[-1][key], int), key
        status, answer = await mgr.post("/api/embed", json={"model": "tiny-chat", "input": "x"})
        assert status == 400 and isinstance(answer["error"], str)
        status, answer = await mgr.post("/api/chat", data=b"{nope")
        assert status == 400 and "JSON" in answer["error"]
        status, answer = await mgr.post("/api/chat", json={"messages": []})
        assert status == 400 and "model" in answer["error"]
        status, answer = await mgr.get("/api/chat")
        assert status == 405


async def test_client_leaving_mid_stream_ends_the_request(tmp_path: Path, tiny_models: Any) -> None:
    async with running_manager(make_config(tmp_path, _llama_models(tiny_models))) as mgr:
        resp = await mgr.http.post(mgr.url + "/api/chat", json=_chat("Tell a long story", 400))
        assert resp.status == 200
        await resp.content.readline()
        resp.close()  # the client leaves
        runtime = mgr.supervisor.resolve("tiny-chat")
        await wait_until(lambda: runtime.pending == 0, timeout=10)
        records = await _rows(mgr)
        assert len(records) == 1 and records[0]["endpoint"] == "/v1/chat/completions"
