"""Edges of the relay: a client that stops reading, paths that mean something else to an
engine, headers named by Connection, answers that have no body."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import fake_command, make_config, running_manager, wait_until


async def test_a_client_that_stops_reading_frees_its_slot(tmp_path: Path) -> None:
    command = fake_command("--chunks", "200000")
    models = {"m": {"max_concurrency": 1, "schemes": {"CPU": {"command": command}}}}
    async with running_manager(make_config(tmp_path, models, read_timeout="1s")) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        host, port = mgr.url.removeprefix("http://").split(":")
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        body = b'{"model": "m", "stream": true, "messages": []}'
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        m = mgr.supervisor.resolve("m")
        await wait_until(lambda: m.gate.active == 1)
        began = time.monotonic()
        try:
            status, _ = await mgr.post(
                "/v1/chat/completions", json={"model": "m", "messages": []}
            )  # waits for the slot the stalled client holds
            assert status == 200
            assert time.monotonic() - began < 5
        finally:
            stalled.close()
        await asyncio.to_thread(mgr.app.db.flush)
        _, rows = await mgr.get("/api/requests?limit=5")
        cut = [r for r in rows["requests"] if r["status"] == 499]
        assert cut and "took no data for 1 s" in cut[0]["error"]
        await mgr.post("/api/models/stop-all")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/x/../chat/completions",
        "/v1/embeddings/%2e%2e/chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1//chat/completions",
        "/v1/./chat/completions",
    ],
)
async def test_paths_an_engine_could_read_otherwise_are_refused(
    tmp_path: Path, spawn_log: Path, path: str
) -> None:
    command = fake_command("--spawn-log", str(spawn_log))
    models = {"e": {"mode": "embedding", "schemes": {"CPU": {"command": command}}}}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        host, port = mgr.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = b'{"model": "e", "messages": []}'
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b"dot segments" in answer
        assert mgr.supervisor.resolve("e").start_count == 0


@pytest.mark.parametrize(
    ("raw_path", "ambiguous"),
    [
        (b"/v1/chat/completions", False),
        (b"/v1/%41/x", False),  # an escape, but not of a separator or a dot segment
        (b"/v1/\xff", False),  # bytes outside ASCII are not separators
        (b"/v1/.well-known", False),
        (b"/v1//chat/completions", True),
        (b"/v1/./chat/completions", True),
        (b"/v1/../v1/chat/completions", True),
        (b"/v1/%2e%2E/x", True),
        (b"/v1/chat%2Fcompletions", True),
        (b"/v1/chat%5ccompletions", True),
        (b"/v1\\chat", True),
    ],
)
def test_which_raw_paths_are_ambiguous(raw_path: bytes, ambiguous: bool) -> None:
    from llm_manager.gateway.endpoints import ambiguous_path

    assert ambiguous_path(raw_path) is ambiguous
