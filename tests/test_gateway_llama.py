"""The gateway in front of real llama.cpp servers (the bundled engine) with tiny GGUF models:
the official openai client, streaming, embeddings, rerank and usage records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import RunningManager, make_config, running_manager

pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")


def engine(model: Path, *flags: str) -> list[str]:
    return [
        # `llm-manager` need not be on PATH: the manager runs its own engine itself.
        "llm-manager", "llama-server", "-m", str(model),
        "--port", "{port}", "-a", "{name}", "-t", "2", "-c", "512", *flags,
    ]  # fmt: skip


def llama_models(tiny: Any) -> dict[str, Any]:
    return {
        "tiny-chat": {"schemes": {"CPU": {"command": engine(tiny.chat)}}},
        "tiny-embed": {
            "mode": "embedding",
            "schemes": {"CPU": {"command": engine(tiny.embedding, "--embedding")}},
        },
        "tiny-rerank": {
            "mode": "reranker",
            "schemes": {"CPU": {"command": engine(tiny.reranker, "--reranking")}},
        },
    }


async def rows(mgr: RunningManager) -> list[dict[str, Any]]:
    await asyncio.to_thread(mgr.app.db.flush)
    _, body = await mgr.get("/api/requests?limit=100")
    return list(reversed(body["requests"]))


def normalised(stream: bytes) -> list[Any]:
    """Events with the per-request fields (id, time, speed) taken out."""
    out: list[Any] = []
    for line in stream.split(b"\n"):
        if not line.startswith(b"data: "):
            continue
        payload = line[6:]
        if payload == b"[DONE]":
            out.append("[DONE]")
            continue
        event = json.loads(payload)
        for key in ("id", "created", "system_fingerprint"):
            event.pop(key, None)
        if "timings" in event:
            event["timings"] = {k: v for k, v in event["timings"].items() if k.endswith("_n")}
        out.append(event)
    return out


async def test_openai_client_against_real_llama_cpp(tmp_path: Path, tiny_models: Any) -> None:
    async with running_manager(make_config(tmp_path, llama_models(tiny_models))) as mgr:
        ai = openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="none", max_retries=0)
        messages: Any = [{"role": "user", "content": "Say hello"}]
        answer = await ai.chat.completions.create(
            model="tiny-chat", messages=messages, max_tokens=8, temperature=0
        )
        assert answer.choices[0].message.content is not None
        assert answer.usage is not None

        stream = await ai.chat.completions.create(
            model="tiny-chat",
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        streamed_usage = chunks[-1].usage
        assert streamed_usage is not None and streamed_usage.completion_tokens > 0

        completion = await ai.completions.create(model="tiny-chat", prompt="Once", max_tokens=4)
        assert completion.choices[0].text is not None

        vectors = await ai.embeddings.create(model="tiny-embed", input=["hello", "world"])
        assert [len(v.embedding) for v in vectors.data] == [64, 64]
        await ai.close()

        status, ranked = await mgr.post(
            "/v1/rerank",
            json={"model": "tiny-rerank", "query": "q", "documents": ["a b", "c d", "e"]},
        )
        assert status == 200
        assert sorted(r["index"] for r in ranked["results"]) == [0, 1, 2]

        records = await rows(mgr)
        assert [(r["model"], r["endpoint"], r["status"]) for r in records] == [
            ("tiny-chat", "/v1/chat/completions", 200),
            ("tiny-chat", "/v1/chat/completions", 200),
            ("tiny-chat", "/v1/completions", 200),
            ("tiny-embed", "/v1/embeddings", 200),
            ("tiny-rerank", "/v1/rerank", 200),
        ]
        plain, streamed, comp, embed, rerank = records
        assert (plain["prompt_tokens"], plain["completion_tokens"]) == (
            answer.usage.prompt_tokens,
            answer.usage.completion_tokens,
        )
        assert plain["prompt_n"] is not None and plain["predicted_n"] is not None
        assert streamed["stream"] is True
        assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (
            streamed_usage.prompt_tokens,
            streamed_usage.completion_tokens,
        )
        assert comp["completion_tokens"] == completion.usage.completion_tokens  # type: ignore[union-attr]
        assert embed["prompt_tokens"] == vectors.usage.prompt_tokens
        assert rerank["prompt_tokens"] == ranked["usage"]["prompt_tokens"]


async def test_stream_through_gateway_equals_direct(tmp_path: Path, tiny_models: Any) -> None:
    async with running_manager(make_config(tmp_path, llama_models(tiny_models))) as mgr:
        await mgr.post("/api/models/tiny-chat/start")
        direct_url = mgr.supervisor.resolve("tiny-chat").base_url
        body = {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": 12,
            "temperature": 0,
            "seed": 7,
            "stream": True,
            "cache_prompt": False,
        }
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
            via_gateway = await resp.read()
        async with mgr.http.post(direct_url + "/v1/chat/completions", json=body) as resp:
            direct = await resp.read()
        events = normalised(via_gateway)
        assert len(events) > 3 and events[-1] == "[DONE]"
        assert events == normalised(direct)
        # llama.cpp streams carry timings, not usage: tokens are derived from them.
        record = (await rows(mgr))[-1]
        finish = next(e for e in events if isinstance(e, dict) and "timings" in e)
        timings = finish["timings"]
        assert record["predicted_n"] == timings["predicted_n"]
        assert record["completion_tokens"] == timings["predicted_n"]
        assert record["prompt_tokens"] == timings["prompt_n"] + timings["cache_n"]


async def test_back_to_back_streams_survive_engine_closing_connections(
    tmp_path: Path, tiny_models: Any
) -> None:
    # llama.cpp closes the connection after every stream although it announced keep-alive.
    async with running_manager(make_config(tmp_path, llama_models(tiny_models))) as mgr:
        body = {"model": "tiny-chat", "messages": [], "max_tokens": 2, "stream": True}
        for i in range(8):
            body["stream"] = i % 2 == 0
            async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        assert [r["status"] for r in await rows(mgr)] == [200] * 8


async def test_mode_gate_protects_embedding_engine(tmp_path: Path, tiny_models: Any) -> None:
    # llama.cpp itself answers a chat request to an embedding server with a 500.
    async with running_manager(make_config(tmp_path, llama_models(tiny_models))) as mgr:
        status, body = await mgr.post(
            "/v1/chat/completions", json={"model": "tiny-embed", "messages": []}
        )
        assert status == 400 and "embedding model" in body["error"]["message"]
