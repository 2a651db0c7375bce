"""The gateway against the fake model server: the official openai client, raw HTTP,
streaming, queueing, disconnects, crashes, usage records and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llm_manager.models.runtime import State
from tests.conftest import (
    RunningManager,
    fake_command,
    make_config,
    read_pids,
    running_manager,
    wait_until,
)


def fake_model(spawn_log: Path, *switches: str, **extra: Any) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log), *switches)
    return {"schemes": {"CPU": {"command": command}}, **extra}


async def records(mgr: RunningManager, **query: str) -> list[dict[str, Any]]:
    await asyncio.to_thread(mgr.app.db.flush)
    status, body = await mgr.get("/api/requests?" + "&".join(f"{k}={v}" for k, v in query.items()))
    assert status == 200
    return list(body["requests"])


def client(mgr: RunningManager) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="unused", max_retries=0)


async def test_openai_client_chat_stream_completions_embeddings(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {
        "chat-model": fake_model(spawn_log, aliases=["chat"]),
        "embed-model": fake_model(spawn_log, mode="embedding"),
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        ai = client(mgr)
        # The model is stopped: the first request starts it.
        answer = await ai.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "hello " * 5
        assert answer.usage is not None and answer.usage.prompt_tokens == 7
        assert mgr.supervisor.resolve("chat").state is State.ROUTING

        stream = await ai.chat.completions.create(
            model="chat-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        assert parts == [f"tok{i} " for i in range(5)]

        completion = await ai.completions.create(model="chat", prompt="once")
        assert completion.choices[0].text == "once upon"

        vectors = await ai.embeddings.create(model="embed-model", input=["a", "b"])
        assert [len(d.embedding) for d in vectors.data] == [3, 3]
        await ai.close()

        rows = await records(mgr)
        by_endpoint = {(r["model"], r["endpoint"], r["stream"]): r for r in rows}
        chat = by_endpoint[("chat-model", "/v1/chat/completions", False)]
        assert chat["status"] == 200
        assert (chat["prompt_tokens"], chat["completion_tokens"]) == (7, 5)
        assert chat["ttfb_ms"] > 0 and chat["duration_ms"] >= chat["ttfb_ms"]
        streamed = by_endpoint[("chat-model", "/v1/chat/completions", True)]
        assert (streamed["prompt_tokens"], streamed["completion_tokens"]) == (7, 5)
        comp = by_endpoint[("chat-model", "/v1/completions", False)]
        assert (comp["cache_n"], comp["prompt_n"], comp["predicted_n"]) == (1, 2, 2)
        emb = by_endpoint[("embed-model", "/v1/embeddings", False)]
        assert emb["prompt_tokens"] == 2
        assert len(rows) == 4

        status, usage = await mgr.get("/api/usage?bucket=day")
        assert status == 200
        assert usage["totals"]["chat-model"]["requests"] == 3
        assert usage["totals"]["chat-model"]["prompt_tokens"] == 7 + 7 + 3
        assert usage["total"]["requests"] == 4
        assert usage["series"]["embed-model"][0]["requests"] == 1
        status, only = await mgr.get("/api/requests?model=embed&limit=10")
        assert [r["model"] for r in only["requests"]] == ["embed-model"]


async def test_anthropic_messages_and_rerank_usage(tmp_path: Path, spawn_log: Path) -> None:
    models = {
        "claude-ish": fake_model(spawn_log),
        "ranker": fake_model(spawn_log, mode="reranker"),
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        body = {"model": "claude-ish", "max_tokens": 5, "messages": [], "stream": True}
        async with mgr.http.post(mgr.url + "/v1/messages", json=body) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "message_stop" in text
        body["stream"] = False
        status, answer = await mgr.post("/v1/messages", json=body)
        assert status == 200 and answer["usage"]["output_tokens"] == 4
        for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
            status, answer = await mgr.post(
                path, json={"model": "ranker", "query": "q", "documents": ["a", "b"]}
            )
            assert status == 200 and answer["results"][0]["relevance_score"] == 1.0
        rows = await records(mgr)
        messages = [r for r in rows if r["endpoint"] == "/v1/messages"]
        assert sorted(
            (r["stream"], r["prompt_tokens"], r["completion_tokens"]) for r in messages
        ) == [
            (False, 11, 4),
            (True, 11, 4),
        ]
        rerank = [r for r in rows if "rerank" in r["endpoint"]]
        assert len(rerank) == 3 and all(r["prompt_tokens"] == 9 for r in rerank)


async def test_stream_is_relayed_as_it_arrives_and_byte_identical(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {"slow": fake_model(spawn_log, "--chunk-delay", "0.3", "--chunks", "5")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        await mgr.post("/api/models/slow/start")
        body = {"model": "slow", "messages": [], "stream": True}
        began = time.monotonic()
        arrivals: list[float] = []
        relayed = b""
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["X-Accel-Buffering"] == "no"
            async for chunk in resp.content.iter_any():
                arrivals.append(time.monotonic() - began)
                relayed += chunk
        # The first event arrived while the backend still had 1.2 s of generating to do.
        assert arrivals[0] < 0.6 and arrivals[-1] > 1.2
        direct = b""
        runtime = mgr.supervisor.resolve("slow")
        async with mgr.http.post(runtime.base_url + "/v1/chat/completions", json=body) as resp:
            direct = await resp.read()
        assert relayed == direct


async def test_fifty_concurrent_streams(tmp_path: Path, spawn_log: Path) -> None:
    models = {"m": fake_model(spawn_log, "--chunks", "20", "--chunk-delay", "0.01")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        ai = client(mgr)

        async def one() -> list[str]:
            stream = await ai.chat.completions.create(model="m", messages=[], stream=True)
            return [c.choices[0].delta.content or "" async for c in stream if c.choices]

        results = await asyncio.gather(*(one() for _ in range(50)))
        await ai.close()
        assert all(r == [f"tok{i} " for i in range(20)] for r in results)
        assert len(read_pids(spawn_log)) == 1  # one start for fifty requests
        assert len(await records(mgr)) == 50


async def test_queue_and_429(tmp_path: Path, spawn_log: Path) -> None:
    models = {"one": fake_model(spawn_log, "--chunk-delay", "1.0", max_concurrency=1, max_queue=1)}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        await mgr.post("/api/models/one/start")
        runtime = mgr.supervisor.resolve("one")
        first = asyncio.create_task(mgr.post("/v1/echo", json={"model": "one", "n": 1}))
        await wait_until(lambda: runtime.gate.active == 1)
        second = asyncio.create_task(mgr.post("/v1/echo", json={"model": "one", "n": 2}))
        await wait_until(lambda: runtime.gate.waiting == 1)
        async with mgr.http.post(mgr.url + "/v1/echo", json={"model": "one"}) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            body = await resp.json()
            assert body["error"]["type"] == "rate_limit_error"
        (s1, b1), (s2, b2) = await first, await second
        assert (s1, s2) == (200, 200)
        assert json.loads(b1["body"])["n"] == 1 and json.loads(b2["body"])["n"] == 2
        assert runtime.gate.active == 0 and runtime.pending == 0


async def test_queued_request_leaves_queue_when_client_leaves(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {"one": fake_model(spawn_log, "--chunk-delay", "1.0", max_concurrency=1)}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        await mgr.post("/api/models/one/start")
        runtime = mgr.supervisor.resolve("one")
        first = asyncio.create_task(mgr.post("/v1/echo", json={"model": "one"}))
        await wait_until(lambda: runtime.gate.active == 1)
        async with aiohttp.ClientSession() as other:
            queued = asyncio.create_task(other.post(mgr.url + "/v1/echo", json={"model": "one"}))
            await wait_until(lambda: runtime.gate.waiting == 1)
        queued.cancel()  # the session closed: the client left
        await wait_until(lambda: runtime.gate.waiting == 0, timeout=5)
        assert (await first)[0] == 200
        await wait_until(lambda: runtime.pending == 0)


async def test_disconnect_cancels_upstream(tmp_path: Path, spawn_log: Path) -> None:
    models = {"m": fake_model(spawn_log, "--chunks", "100", "--chunk-delay", "0.1")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        await mgr.post("/api/models/m/start")
        runtime = mgr.supervisor.resolve("m")
        body = {"model": "m", "messages": [], "stream": True}
        async with aiohttp.ClientSession() as other:
            resp = await other.post(mgr.url + "/v1/chat/completions", json=body)
            await resp.content.readline()
            resp.close()  # leave mid-stream
        await wait_until(
            lambda: any("stream cancelled by client" in x.message for x in runtime.log.lines()),
            timeout=5,
        )
        await wait_until(lambda: runtime.pending == 0)
        rows = await records(mgr)
        assert rows[0]["status"] == 499 and rows[0]["error"] == "client disconnected"
        # Also before the first byte: a non-streamed request still being computed.
        async with aiohttp.ClientSession() as other:
            task = asyncio.create_task(other.post(mgr.url + "/v1/echo", json={"model": "m"}))
            await wait_until(lambda: runtime.pending == 1)
            await asyncio.sleep(0.05)
        task.cancel()
        await wait_until(lambda: runtime.pending == 0, timeout=5)


async def test_crash_mid_stream_ends_with_error_and_next_request_restarts(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {"m": fake_model(spawn_log, "--crash-after-chunks", "2")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        ai = client(mgr)
        stream = await ai.chat.completions.create(model="m", messages=[], stream=True)
        seen = []
        with pytest.raises(openai.APIError, match="mid-response"):
            async for chunk in stream:
                seen.append(chunk)
        assert len(seen) == 2
        runtime = mgr.supervisor.resolve("m")
        await wait_until(lambda: runtime.state is State.FAILED)
        assert runtime.failure_reason == "process exited with code 7"
        answer = await ai.chat.completions.create(model="m", messages=[])
        assert answer.choices[0].message.content
        assert len(read_pids(spawn_log)) == 2
        await ai.close()
        rows = await records(mgr)
        assert [r["status"] for r in reversed(rows)] == [502, 200]


async def test_forwarding_of_any_path_with_query_model_and_headers(
    tmp_path: Path, spawn_log: Path
) -> None:
    async with running_manager(make_config(tmp_path, {"m": fake_model(spawn_log)})) as mgr:
        headers = {"X-Custom": "kept", "Connection": "keep-alive", "Authorization": "Bearer k"}
        async with mgr.http.get(mgr.url + "/v1/echo?model=m&x=1", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["X-Fake"] == "yes"
            # Its length is announced: nothing for a proxy in front to hold back.
            assert "Content-Length" in resp.headers
            assert "X-Accel-Buffering" not in resp.headers
            echo = await resp.json()
        assert echo["method"] == "GET" and echo["path"] == "/v1/echo"
        assert echo["query"] == "model=m&x=1"
        sent = {k.lower(): v for k, v in echo["headers"].items()}
        assert sent["x-custom"] == "kept" and sent["authorization"] == "Bearer k"
        assert sent["accept-encoding"] == "identity"
        assert "keep-alive" not in sent.get("connection", "")  # hop-by-hop: not forwarded
        # A non-JSON body (an upload) is forwarded byte for byte when ?model= names the model.
        async with mgr.http.put(mgr.url + "/v1/echo?model=m", data=b"\x00\x01raw") as resp:
            echo = await resp.json()
        assert echo["method"] == "PUT" and echo["body"] == "\x00\x01raw"


async def test_a_post_on_a_reused_connection_the_engine_dropped_is_not_sent_twice(
    tmp_path: Path,
) -> None:
    server = Path(__file__).parent / "fakes" / "drop_reused.py"
    models = {"m": {"schemes": {"CPU": {"command": [sys.executable, str(server), "{port}"]}}}}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        runtime = mgr.supervisor.resolve("m")

        def drops() -> int:
            return [x.message for x in runtime.log.lines()].count("dropped a reused connection")

        # The engine read each POST that came on a reused connection, then dropped it: the
        # POST may have been worked on, so it is not sent again; the client gets 502.
        statuses = []
        for _ in range(5):
            status, body = await mgr.post("/v1/chat/completions", json={"model": "m"})
            statuses.append(status)
            if status == 502:
                assert "not sent again" in body["error"]["message"]
        assert statuses == [200, 502, 200, 502, 200]
        await wait_until(lambda: drops() == 2)
        # A request marked idempotent is sent again on a new connection: no client sees
        # the drop.
        for _ in range(4):
            status, _ = await mgr.post(
                "/v1/chat/completions", json={"model": "m"}, headers={"Idempotency-Key": "k"}
            )
            assert status == 200
        await wait_until(lambda: drops() >= 3)
        rows = await records(mgr)
        assert [r["status"] for r in rows].count(502) == 2


BAD_INPUTS = [
    ("POST", "/v1/chat/completions", b"{not json", 400, "invalid JSON"),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("POST", "/v1/chat/completions", b'"text"', 400, "not JSON"),
    ("POST", "/v1/chat/completions", b"{}", 400, "names no model"),
    ("POST", "/v1/chat/completions", b"", 400, "names no model"),
    ("POST", "/v1/chat/completions", b'{"model": ""}', 400, "non-empty string"),
    ("POST", "/v1/chat/completions", b'{"model": 42}', 400, "non-empty string"),
    ("POST", "/v1/chat/completions", b'{"model": null}', 400, "non-empty string"),
    ("POST", "/v1/chat/completions", b'{"model": "nope"}', 404, "not found"),
    ("POST", "/v1/embeddings", b'{"model": "chat-model", "input": "x"}', 400, "chat model"),
    ("POST", "/v1/chat/completions", b'{"model": "embed-model"}', 400, "embedding model"),
    ("GET", "/v1/chat/completions", b"", 405, "use POST"),
    ("DELETE", "/v1/embeddings", b"", 405, "use POST"),
    ("POST", "/v1/chat/completions", b"\xff\xfe\x00garbage", 400, "not JSON"),
    # JSON is UTF-8: an invalid byte in a field the manager does not read is still a 400
    ("POST", "/v1/chat/completions", b'{"model": "chat-model", "x": "\xff"}', 400, "invalid JSON"),
    ("GET", "/v1/whatever", b"", 404, "no route"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "text"), BAD_INPUTS)
async def test_bad_input_is_a_clear_4xx(
    tmp_path: Path, spawn_log: Path, method: str, path: str, body: bytes, status: int, text: str
) -> None:
    models = {
        "chat-model": fake_model(spawn_log),
        "embed-model": fake_model(spawn_log, mode="embedding"),
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        async with mgr.http.request(method, mgr.url + path, data=body) as resp:
            assert resp.status == status
            answer = await resp.json()
        assert text in answer["error"]["message"]
        assert answer["error"]["type"] and answer["error"]["code"] == status
        assert read_pids(spawn_log) == []  # nothing was started for a bad request
        assert (await mgr.get("/health"))[0] == 200


async def test_oversized_body_is_413(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": fake_model(spawn_log)}, max_body_bytes=1000)
    async with running_manager(loaded) as mgr:
        big = json.dumps({"model": "m", "pad": "x" * 2000}).encode()
        async with mgr.http.post(mgr.url + "/v1/chat/completions", data=big) as resp:
            assert resp.status == 413
            assert "exceeds 1000 bytes" in (await resp.json())["error"]["message"]

        async def chunks() -> Any:  # no Content-Length: the limit applies while reading
            for _ in range(4):
                yield b"x" * 400

        async with mgr.http.post(mgr.url + "/v1/chat/completions", data=chunks()) as resp:
            assert resp.status == 413
        assert read_pids(spawn_log) == []


async def test_start_failure_through_gateway_is_503(tmp_path: Path, spawn_log: Path) -> None:
    models = {"m": fake_model(spawn_log, "--exit-at-start", "2")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, body = await mgr.post("/v1/chat/completions", json={"model": "m"})
        assert status == 503 and "exited with code 2" in body["error"]["message"]
        rows = await records(mgr)
        assert rows[0]["status"] == 503
        assert mgr.supervisor.resolve("m").pending == 0


async def test_model_dying_or_stopped_mid_request_gives_502(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {"m": fake_model(spawn_log, "--chunk-delay", "3")}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        await mgr.post("/api/models/m/start")
        runtime = mgr.supervisor.resolve("m")
        # A stop while a non-streamed request is in flight ends it with an error, not a hang.
        request = asyncio.create_task(mgr.post("/v1/echo", json={"model": "m"}))
        await wait_until(lambda: runtime.pending == 1)
        await asyncio.sleep(0.1)
        assert (await mgr.post("/api/models/m/stop"))[0] == 200
        status, body = await asyncio.wait_for(request, 10)
        assert status == 502 and body["error"]["type"] == "upstream_error"
        # The process dying by itself mid-request: 502 too, and the model is failed.
        await mgr.post("/api/models/m/start")
        request = asyncio.create_task(mgr.post("/v1/echo", json={"model": "m"}))
        await wait_until(lambda: runtime.pending == 1)
        await asyncio.sleep(0.1)
        assert runtime.pid is not None
        os.kill(runtime.pid, signal.SIGKILL)
        status, body = await asyncio.wait_for(request, 10)
        assert status == 502
        await wait_until(lambda: runtime.state is State.FAILED)
        assert runtime.failure_reason == "process exited with code -9"
        assert runtime.pending == 0


async def test_alias_is_rewritten_to_the_configured_name(tmp_path: Path, spawn_log: Path) -> None:
    models = {"Qwen3-8B-Instruct": fake_model(spawn_log, aliases=["qwen"])}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        for called, rewritten in (("qwen", True), ("Qwen3-8B-Instruct", False)):
            raw = json.dumps({"model": called, "x": "é"}, ensure_ascii=False).encode()
            async with mgr.http.post(mgr.url + "/v1/echo", data=raw) as resp:
                sent = json.loads((await resp.json())["body"])
            assert sent == {"model": "Qwen3-8B-Instruct", "x": "é"}
            if not rewritten:  # the configured name: the body goes out byte for byte
                async with mgr.http.post(mgr.url + "/v1/echo", data=raw) as resp:
                    assert (await resp.json())["body"].encode() == raw


async def test_read_timeout_is_504_and_errors_are_openai_shaped_off_v1(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {
        "slow": fake_model(spawn_log, "--chunk-delay", "3"),
        "chat": fake_model(spawn_log),
    }
    loaded = make_config(tmp_path, models, read_timeout="0.5s")
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/v1/echo", json={"model": "slow"})
        assert status == 504 and "read_timeout" in body["error"]["message"]
        status, body = await mgr.post("/rerank", json={"model": "chat", "query": "q"})
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        assert "is a chat model" in body["error"]["message"]
        # A GET without a body reaches the model without a made-up body.
        async with mgr.http.get(mgr.url + "/v1/echo?model=chat") as resp:
            headers = {k.lower() for k in (await resp.json())["headers"]}
        assert "content-length" not in headers and "content-type" not in headers
