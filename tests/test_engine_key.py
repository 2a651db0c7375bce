"""{api_key}: an engine that wants a key gets one of its own per start, and only the
manager's relay and probe send it (an engine on the network answers nobody else)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from llm_manager.models.launch import new_api_key
from tests.conftest import fake_command, make_config, running_manager


async def _direct(port: int, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/v1/models", headers=headers) as resp,
    ):
        return resp.status


async def test_the_engine_key_is_sent_by_the_manager_only(tmp_path: Path) -> None:
    models = {"keyed": {"schemes": {"cpu": {"command": fake_command("--api-key", "{api_key}")}}}}
    async with running_manager(make_config(tmp_path, models)) as manager:
        chat = {"model": "keyed", "messages": [{"role": "user", "content": "hi"}]}
        # The client's own Authorization is not the engine's: it is replaced.
        status, body = await manager.post(
            "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer client-key"}
        )
        assert status == 200, body
        status, body = await manager.get("/upstream/keyed/v1/models")
        assert status == 200, body
        runtime = manager.supervisor.resolve("keyed")
        first = runtime.engine_auth[1].decode().removeprefix("Bearer ")
        assert len(first) >= 24
        assert await _direct(runtime.port, None) == 401
        assert await _direct(runtime.port, "client-key") == 401
        assert await _direct(runtime.port, first) == 200
        status, _ = await manager.post("/api/models/keyed/stop")
        assert status == 200 and runtime.engine_auth is None
        status, body = await manager.post("/v1/chat/completions", json=chat)
        assert status == 200, body
        second = runtime.engine_auth[1].decode().removeprefix("Bearer ")
        assert second != first  # a key of each start's own


async def test_without_the_placeholder_the_clients_key_goes_through(tmp_path: Path) -> None:
    # The engine wants "k"; the scheme names it itself: the client's header is relayed.
    models = {"plain": {"schemes": {"cpu": {"command": fake_command("--api-key", "k")}}}}
    async with running_manager(make_config(tmp_path, models)) as manager:
        chat = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
        status, _ = await manager.post(
            "/v1/chat/completions", json=chat, headers={"Authorization": "Bearer k"}
        )
        assert status == 200
        assert manager.supervisor.resolve("plain").engine_auth is None
        status, _ = await manager.post("/v1/chat/completions", json=chat)
        assert status == 401


def test_an_engine_key_never_reads_as_a_command_line_option() -> None:
    # URL-safe keys began with "-" once in 64 starts, and "--api-key -X..." failed the
    # start (argparse: "expected one argument"; seen in CI).
    keys = {new_api_key() for _ in range(5000)}
    assert len(keys) == 5000
    assert all(len(key) == 32 and key.isalnum() for key in keys)
