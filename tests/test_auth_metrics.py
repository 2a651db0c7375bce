"""API keys, CORS, Prometheus metrics and the overhead header, against real processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest

from llm_manager.auth import KeyCheck, Need, required
from llm_manager.metrics import Metrics
from llm_manager.store.usage import RequestRecord
from tests.conftest import fake_command, make_config, running_manager


def fake(spawn_log: Path) -> dict[str, Any]:
    return {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}}}


@pytest.mark.parametrize(
    ("method", "path", "management", "need"),
    [
        ("GET", "/health", True, Need.NOTHING),
        ("GET", "/", True, Need.NOTHING),
        ("GET", "/docs", True, Need.NOTHING),
        ("OPTIONS", "/v1/chat/completions", False, Need.API_KEY),
        ("GET", "/v1/models", True, Need.API_KEY),
        ("POST", "/v1/chat/completions", False, Need.API_KEY),
        ("POST", "/rerank", False, Need.API_KEY),
        ("GET", "/api/models/all-models/info", True, Need.ANY_KEY),
        ("POST", "/api/models/m/start", True, Need.ADMIN_KEY),
        ("GET", "/metrics", True, Need.ADMIN_KEY),
        ("GET", "/ui", True, Need.ADMIN_KEY),
    ],
)
def test_what_each_path_needs(method: str, path: str, management: bool, need: Need) -> None:
    assert required(method, path, management) is need


def test_key_check_rules() -> None:
    both = KeyCheck(["user"], ["root"])
    assert both.allows(Need.API_KEY, b"user") and both.allows(Need.API_KEY, b"root")
    assert not both.allows(Need.ADMIN_KEY, b"user") and both.allows(Need.ADMIN_KEY, b"root")
    assert not both.allows(Need.API_KEY, None) and not both.allows(Need.API_KEY, b"userx")
    only_api = KeyCheck(["user"], [])  # admin falls back to the api keys: never left open
    assert only_api.allows(Need.ADMIN_KEY, b"user") and not only_api.allows(Need.ADMIN_KEY, None)
    only_admin = KeyCheck([], ["root"])  # the gateway stays open, management does not
    assert only_admin.allows(Need.API_KEY, None) and not only_admin.allows(Need.ADMIN_KEY, None)
    assert not KeyCheck([], []).enabled and KeyCheck([], []).allows(Need.ADMIN_KEY, None)


async def test_keys_enforced_end_to_end_and_stripped_before_forwarding(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(
        tmp_path, {"m": fake(spawn_log)}, api_keys=["user-key"], admin_keys=["admin-key"]
    )
    async with running_manager(loaded) as mgr:
        assert (await mgr.get("/health"))[0] == 200
        status, body = await mgr.post("/v1/chat/completions", json={"model": "m"})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, body = await mgr.post("/api/models/m/start")
        assert status == 401 and body["success"] is False
        user = {"Authorization": "Bearer user-key"}
        admin = {"x-api-key": "admin-key"}
        # The user key may not manage, the admin key may.
        assert (await mgr.post("/api/models/m/start", headers=user))[0] == 401
        async with mgr.http.get(mgr.url + "/api/models/m/info", headers=user) as resp:
            assert resp.status == 200
        assert (await mgr.post("/api/models/m/start", headers=admin))[0] == 200
        # Forwarded with the user key; the key does not reach the model server.
        status, echo = await mgr.post("/v1/echo", json={"model": "m"}, headers=user)
        assert status == 200
        sent = {k.lower() for k in echo["headers"]}
        assert "authorization" not in sent and "x-api-key" not in sent
        ai = openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="user-key", max_retries=0)
        answer = await ai.chat.completions.create(model="m", messages=[])
        assert answer.choices[0].message.content
        bad = openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        await ai.close()
        await bad.close()
        async with mgr.http.get(mgr.url + "/metrics") as resp:
            assert resp.status == 401
        await mgr.post("/api/models/m/stop", headers=admin)


async def test_cors_when_configured(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log)}, cors_origins=["http://app.example"])
    async with running_manager(loaded) as mgr:
        preflight = {
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        async with mgr.http.options(mgr.url + "/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        async with mgr.http.get(mgr.url + "/health", headers={"Origin": "http://evil"}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
    async with running_manager(make_config(tmp_path, {})) as mgr:  # off by default
        origin = {"Origin": "http://app.example"}
        response = await mgr.http.get(mgr.url + "/health", headers=origin)
        assert "Access-Control-Allow-Origin" not in response.headers
        response.release()


async def test_metrics_and_overhead_header(tmp_path: Path, spawn_log: Path) -> None:
    async with running_manager(make_config(tmp_path, {"m": fake(spawn_log)})) as mgr:
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json={"model": "m"}) as resp:
            assert resp.status == 200
            overhead = float(resp.headers["X-LLM-Manager-Overhead-Ms"])
            await resp.read()
        assert 0 < overhead < 100
        body = {"model": "m", "stream": True}
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
            await resp.read()
        await mgr.post("/v1/chat/completions", json={"model": "nope"})  # 404: not a model's
        await mgr.get("/api/devices/info")  # a device snapshot for the device gauges
        async with mgr.http.get(mgr.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        lines = set(text.splitlines())
        assert (
            'llm_manager_requests_total{endpoint="/v1/chat/completions",model="m",status="200"} 2.0'
            in lines
        )
        assert 'llm_manager_tokens_total{kind="prompt",model="m"} 14.0' in lines
        assert 'llm_manager_tokens_total{kind="completion",model="m"} 10.0' in lines
        assert 'llm_manager_request_duration_seconds_count{model="m"} 2.0' in lines
        assert 'llm_manager_time_to_first_byte_seconds_count{model="m"} 2.0' in lines
        assert "llm_manager_gateway_overhead_seconds_count 2.0" in lines
        assert 'llm_manager_model_state{model="m",state="routing"} 1.0' in lines
        assert 'llm_manager_model_state{model="m",state="stopped"} 0.0' in lines
        assert 'llm_manager_model_starts{model="m"} 1.0' in lines
        assert 'llm_manager_model_crashes{model="m"} 0.0' in lines
        assert 'llm_manager_pending_requests{model="m"} 0.0' in lines
        assert any(
            line.startswith('llm_manager_device_memory_free_mib{device="cpu"') for line in lines
        )
        assert any(
            line.startswith('llm_manager_model_last_start_seconds{model="m"}') for line in lines
        )
        runtime = mgr.supervisor.resolve("m")
        assert runtime.pid is not None
        import os
        import signal

        os.kill(runtime.pid, signal.SIGKILL)
        for _ in range(100):
            if runtime.crash_count:
                break
            await asyncio.sleep(0.05)
        async with mgr.http.get(mgr.url + "/metrics") as resp:
            assert 'llm_manager_model_crashes{model="m"} 1.0' in (await resp.text()).splitlines()


async def test_cli_sends_the_key_from_the_environment(tmp_path: Path, spawn_log: Path) -> None:
    import os
    import subprocess
    import sys

    loaded = make_config(tmp_path, {"m": fake(spawn_log)}, admin_keys=["root"])
    async with running_manager(loaded) as mgr:
        cli = [sys.executable, "-m", "llm_manager", "models", "--json", "--url", mgr.url]
        env = {k: v for k, v in os.environ.items() if k != "LLM_MANAGER_API_KEY"}
        without = await asyncio.to_thread(
            subprocess.run, cli, capture_output=True, text=True, env=env
        )
        assert without.returncode == 1 and "missing or invalid API key" in without.stdout
        with_key = await asyncio.to_thread(
            subprocess.run,
            cli,
            capture_output=True,
            text=True,
            env={**env, "LLM_MANAGER_API_KEY": "root"},
        )
        assert with_key.returncode == 0 and '"m"' in with_key.stdout


def test_histograms_count_values_on_a_bound_in_that_bucket() -> None:
    """The request metrics are plain counters turned into families at scrape time."""

    class NoModels:
        runtimes: list[object] = []
        cluster = None

    class NoDevices:
        latest = None

    metrics = Metrics(NoModels(), NoDevices())  # type: ignore[arg-type]
    for ms in (5.0, 7.0, 400_000.0):
        done = RequestRecord("m", "/v1/embeddings", "POST", status=200, duration_ms=ms)
        done.prompt_tokens = 3
        metrics.observe(done)
    lines = metrics.render().decode().splitlines()
    assert (
        'llm_manager_requests_total{endpoint="/v1/embeddings",model="m",status="200"} 3.0' in lines
    )
    assert 'llm_manager_tokens_total{kind="prompt",model="m"} 9.0' in lines
    duration = "llm_manager_request_duration_seconds"
    assert f'{duration}_bucket{{le="0.005",model="m"}} 1.0' in lines  # 5 ms is <= 0.005
    assert f'{duration}_bucket{{le="0.01",model="m"}} 2.0' in lines  # cumulative
    assert f'{duration}_bucket{{le="300.0",model="m"}} 2.0' in lines
    assert f'{duration}_bucket{{le="+Inf",model="m"}} 3.0' in lines
    assert f'{duration}_count{{model="m"}} 3.0' in lines
    assert f'{duration}_sum{{model="m"}} 400.012' in lines
    assert not any(
        line.startswith("llm_manager_time_to_first_byte_seconds_count") for line in lines
    )
