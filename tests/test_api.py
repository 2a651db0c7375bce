"""Management API: the seed's shapes, error shapes and codes (contract §5-§6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_manager import __version__
from tests.conftest import fake_command, make_config, running_manager

INFO_KEYS = {
    "model_name",
    "aliases",
    "status",
    "pid",
    "idle_time_sec",
    "mode",
    "is_available",
    "current_bat_path",
    "config_source",
    "failure_reason",
    "pending_requests",
}


def two_models(tmp_path: Path, spawn_log: Path) -> dict[str, object]:
    return {
        "Qwen3-Coder-30B-A3B-Instruct-UD-64K": {
            "aliases": ["Qwen3-Coder-30B-A3B-Instruct-64K", "Qwen3-Coder-30B-A3B-Instruct"],
            "mode": "chat",
            "schemes": {
                "CPU": {
                    "devices": {"cpu": 0},
                    "command": fake_command("--spawn-log", str(spawn_log)),
                }
            },
        },
        "bge-m3": {
            "mode": "embedding",
            "schemes": {"CPU": {"script": "start.sh"}},
        },
    }


async def test_system_endpoints(tmp_path: Path, spawn_log: Path) -> None:
    async with running_manager(make_config(tmp_path, two_models(tmp_path, spawn_log))) as mgr:
        status, body = await mgr.get("/")
        assert status == 200
        assert body == {
            "message": "LLM-Manager API Server",
            "version": __version__,
            "models_url": "/v1/models",
        }
        status, body = await mgr.get("/health")
        assert body["storage"]["ok"] is True
        del body["storage"]
        assert body == {"status": "healthy", "models_count": 2, "running_models": 0}
        status, body = await mgr.get("/v1/models")
        assert body["object"] == "list"
        first = body["data"][0]
        assert first["id"] == "Qwen3-Coder-30B-A3B-Instruct-UD-64K"
        assert first["object"] == "model" and first["owned_by"] == "user"
        assert isinstance(first["created"], int)
        assert first["aliases"] == [
            "Qwen3-Coder-30B-A3B-Instruct-64K",
            "Qwen3-Coder-30B-A3B-Instruct",
        ]


async def test_info_single_and_all_models(tmp_path: Path, spawn_log: Path) -> None:
    async with running_manager(make_config(tmp_path, two_models(tmp_path, spawn_log))) as mgr:
        # A unique prefix resolves (contract §3).
        status, body = await mgr.get("/api/models/Qwen3-Coder-30B/info")
        assert status == 200 and body["success"] is True
        info = body["model"]
        assert set(info) >= INFO_KEYS
        assert info["model_name"] == "Qwen3-Coder-30B-A3B-Instruct-UD-64K"
        assert info["status"] == "stopped" and info["pid"] is None
        assert info["mode"] == "Chat" and info["is_available"] is True
        assert info["config_source"] == "CPU"
        assert info["failure_reason"] is None and info["pending_requests"] == 0
        assert isinstance(info["idle_time_sec"], int)
        status, body = await mgr.get("/api/models/BGE-M3/info")  # case-insensitive
        assert body["model"]["mode"] == "Embedding"
        assert body["model"]["current_bat_path"] == "start.sh"

        status, body = await mgr.get("/api/models/all-models/info")
        assert status == 200 and body["success"] is True
        assert body["total_models"] == 2 and body["running_models"] == 0
        assert body["total_pending_requests"] == 0
        assert set(body["models"]) == {"Qwen3-Coder-30B-A3B-Instruct-UD-64K", "bge-m3"}
        assert set(body["models"]["bge-m3"]) >= INFO_KEYS

        assert (await mgr.post("/api/models/qwen3-coder-30b-a3b-instruct/start"))[0] == 200
        _, body = await mgr.get("/api/models/all-models/info")
        assert body["running_models"] == 1
        _, health = await mgr.get("/health")
        assert health["running_models"] == 1
        await mgr.post("/api/models/stop-all")


async def test_errors_have_the_seed_shape_and_codes(tmp_path: Path, spawn_log: Path) -> None:
    async with running_manager(make_config(tmp_path, two_models(tmp_path, spawn_log))) as mgr:
        for method, path in [
            ("GET", "/api/models/nope/info"),
            ("POST", "/api/models/nope/start"),
            ("POST", "/api/models/nope/stop"),
        ]:
            async with mgr.http.request(method, mgr.url + path) as resp:
                body = await resp.json()
                assert resp.status == 404, path
                assert body["success"] is False and "'nope' not found" in body["message"]
                assert "Qwen3-Coder-30B-A3B-Instruct-UD-64K" in body["error"]
        # Ambiguous prefix: 404 naming the candidates.
        status, body = await mgr.get("/api/models/Qwen3-Coder-30B-A3B-Instruct-64/info")
        assert status == 200  # unique: both aliases belong to one model
        status, body = await mgr.get("/api/models/b/info")
        assert status == 200 and body["model"]["model_name"] == "bge-m3"

        status, body = await mgr.get("/api/models/nope/start")  # wrong method
        assert status == 405 and body == {
            "success": False,
            "message": "method not allowed",
            "error": "method not allowed",
        }
        status, body = await mgr.get("/no/such/route")
        assert status == 404 and body["success"] is False
        status, body = await mgr.get("/v1/no-such-route")
        assert status == 404 and body["error"]["code"] == 404 and "type" in body["error"]

        # A script that does not exist: 503 with a clear reason, the server keeps serving.
        status, body = await mgr.post("/api/models/bge-m3/start")
        assert status == 503 and "start.sh does not exist" in body["message"]
        _, info = await mgr.get("/api/models/bge-m3/info")
        assert info["model"]["status"] == "failed"
        assert "start.sh does not exist" in info["model"]["failure_reason"]
        assert (await mgr.get("/health"))[0] == 200


async def test_ambiguous_prefix_is_404(tmp_path: Path, spawn_log: Path) -> None:
    models = {
        "llama-8b": {"schemes": {"CPU": {"command": "true"}}},
        "llama-70b": {"schemes": {"CPU": {"command": "true"}}},
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, body = await mgr.get("/api/models/llama/info")
        assert status == 404 and "ambiguous" in body["message"]
        assert "llama-70b" in body["message"] and "llama-8b" in body["message"]


async def test_command_not_found_is_503(tmp_path: Path) -> None:
    models = {"m": {"schemes": {"CPU": {"command": "no-such-engine-binary --port {port}"}}}}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, body = await mgr.post("/api/models/m/start")
        assert status == 503 and "'no-such-engine-binary' not found" in body["message"]


async def test_openapi_and_docs(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, {})) as mgr:
        status, schema = await mgr.get("/openapi.json")
        assert status == 200
        assert "/api/models/{alias}/start" in schema["paths"]
        async with mgr.http.get(mgr.url + "/docs") as resp:
            assert resp.status == 200 and "swagger" in (await resp.text()).lower()


@pytest.mark.parametrize(
    "path",
    [
        "/api/models/%00/info",
        "/api/models/" + "x" * 5000 + "/info",
        "/api/models/%F0%9F%98%80/start",
        "/api/models/../info",
        "/api/models/all-models/start",
    ],
)
async def test_odd_names_never_500(tmp_path: Path, path: str) -> None:
    method = "POST" if path.endswith("start") else "GET"
    async with running_manager(make_config(tmp_path, {})) as mgr:
        status, body = await (mgr.post(path) if method == "POST" else mgr.get(path))
        assert status in (404, 405), body
        assert body["success"] is False
