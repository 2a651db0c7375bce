"""Every method x route family x key state against a real manager with api and admin keys:
what needs which key, and that nothing without a valid key reaches or starts a model."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from llm_manager.models.runtime import State
from tests.conftest import fake_command, make_config, read_pids, running_manager

API, ADMIN = "api-key-1", "admin-key-1"
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
KEYS = {"none": None, "wrong": "nope", "api": API, "admin": ADMIN}


def accepted(method: str, path: str) -> set[str]:
    """Which keys a path accepts for a method ("api": an api or an admin key)."""
    if path in ("/health", "/"):
        return {"none", "wrong", "api", "admin"}
    if path in ("/metrics", "/ui"):
        return {"admin"}
    if path.startswith("/api/"):
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            return {"admin"}
        return {"api", "admin"}
    return {"api", "admin"}  # /v1/*, any forwarded path


PATHS = (
    "/health",
    "/",
    "/v1/models",
    "/v1/chat/completions?model=m",
    "/slots?model=m",
    "/api/models/all-models/info",
    "/api/models/m/start",
    "/api/models/m/logs/stream",
    "/metrics",
    "/ui",
)


def _spec(spawn_log: Path) -> dict[str, object]:
    return {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}}}


async def test_auth_matrix(tmp_path: Path, spawn_log: Path) -> None:
    spec = _spec(spawn_log)
    loaded = make_config(tmp_path, {"m": spec}, api_keys=[API], admin_keys=[ADMIN])
    refused = []
    async with running_manager(loaded) as mgr:
        m = mgr.supervisor.resolve("m")
        timeout = aiohttp.ClientTimeout(total=5, sock_read=1)
        for path in PATHS:
            for method in METHODS:
                for label, key in KEYS.items():
                    if label in accepted(method, path):
                        continue  # refusals only: accepted requests may start the model
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    async with mgr.http.request(
                        method, mgr.url + path, headers=headers, timeout=timeout
                    ) as resp:
                        refused.append((method, path, label, resp.status))
                    assert m.state is State.STOPPED, (method, path, label)
        assert read_pids(spawn_log) == []  # nothing without a valid key started a model
        wrong = [r for r in refused if r[3] != 401]
        assert not wrong, wrong
        assert len(refused) > 130

        # The accepted side: each key works where it should (one request per family).
        for method, path, key, expected in (
            ("GET", "/v1/models", API, 200),
            ("GET", "/api/models/all-models/info", API, 200),
            ("POST", "/api/models/m/start", API, 401),
            ("POST", "/api/models/m/stop", ADMIN, 200),
            ("GET", "/metrics", ADMIN, 200),
            ("OPTIONS", "/slots?model=m", API, 404),  # the engine's own 404: forwarded
        ):
            headers = {"Authorization": f"Bearer {key}"}
            async with mgr.http.request(method, mgr.url + path, headers=headers) as resp:
                assert resp.status == expected, (method, path)
        await mgr.post("/api/models/stop-all", headers={"x-api-key": ADMIN})


async def test_a_cors_preflight_is_never_forwarded(tmp_path: Path, spawn_log: Path) -> None:
    spec = _spec(spawn_log)
    preflight = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    # CORS off, no keys: refused, not forwarded.
    async with running_manager(make_config(tmp_path, {"m": spec})) as mgr:
        resp = await mgr.http.options(mgr.url + "/slots?model=m", headers=preflight)
        assert resp.status == 403
        assert (await resp.json())["error"]["type"] == "permission_error"
    # CORS on: answered by LLM-Manager itself.
    loaded = make_config(
        tmp_path, {"m": spec}, cors_origins=["http://localhost:3000"], api_keys=[API]
    )
    async with running_manager(loaded) as mgr:
        resp = await mgr.http.options(mgr.url + "/slots?model=m", headers=preflight)
        assert resp.status == 200
        assert resp.headers["access-control-allow-origin"] == "http://localhost:3000"
        resp.release()
    assert read_pids(spawn_log) == []


async def test_only_admin_keys_the_clients_key_is_not_forwarded(
    tmp_path: Path, spawn_log: Path
) -> None:
    spec = _spec(spawn_log)
    loaded = make_config(tmp_path, {"m": spec}, admin_keys=[ADMIN])
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post(
            "/v1/echo?model=m", data=b"x", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert status == 200  # the gateway is open with only admin keys
        assert "Authorization" not in body["headers"] and "authorization" not in body["headers"]
        await mgr.post("/api/models/stop-all", headers={"x-api-key": ADMIN})
