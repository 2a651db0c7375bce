"""A client and the request records learn why an answer failed: a stop, an eviction or a
shutdown that cut it; an engine's own error; a streamed request that failed early; and a
model's log tells of the process an earlier, killed manager left behind."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import psutil

from llm_manager.models.runtime import State
from tests.conftest import RunningManager, fake_command, make_config, running_manager, wait_until


async def rows(mgr: RunningManager) -> list[dict[str, Any]]:
    await asyncio.to_thread(mgr.app.db.flush)
    _, body = await mgr.get("/api/requests?limit=20")
    return list(body["requests"])


async def test_a_stream_cut_by_a_stop_says_so(tmp_path: Path) -> None:
    command = fake_command("--chunks", "50", "--chunk-delay", "0.1")
    models = {"m": {"schemes": {"CPU": {"command": command}}}}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        m = mgr.supervisor.resolve("m")
        body = {"model": "m", "messages": [], "stream": True}
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readline()  # the stream has begun
            await wait_until(lambda: m.admitted == 1)
            stopping = asyncio.create_task(mgr.post("/api/models/m/stop"))
            text = (await resp.read()).decode()
        await stopping
        last = [line for line in text.split("\n") if line.startswith("data: ")][-1]
        error = json.loads(last[6:])["error"]
        assert error["message"] == "model 'm' was stopped while answering (stop requested)"
        (record,) = await rows(mgr)
        assert record["status"] == 502 and record["stream"] is True
        assert record["error"] == error["message"]


async def test_an_eviction_that_cuts_a_non_streamed_answer_is_recorded(tmp_path: Path) -> None:
    command = fake_command("--chunk-delay", "2")
    models = {"m": {"schemes": {"CPU": {"command": command}}}}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        m = mgr.supervisor.resolve("m")
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        request = asyncio.create_task(mgr.post("/v1/echo?model=m", data=b"x"))
        await wait_until(lambda: m.admitted == 1)
        await asyncio.sleep(0.2)  # the engine has the request
        await m.stop("evicted to make room for other")
        status, body = await request
        assert status == 502
        assert "was stopped while answering (evicted to make room for other)" in str(body)
        (record,) = await rows(mgr)
        assert record["error"].startswith("model 'm' was stopped while answering")


async def test_an_engines_own_error_and_a_failed_stream_are_recorded(tmp_path: Path) -> None:
    models = {
        "m": {"schemes": {"CPU": {"command": fake_command()}}},
        "broken": {"schemes": {"CPU": {"command": fake_command("--exit-at-start", "3")}}},
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        async with mgr.http.get(mgr.url + "/no/such/route?model=m") as resp:
            assert resp.status == 404  # the engine's own answer, relayed
        body = {"model": "broken", "messages": [], "stream": True}
        async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 503
        by_model = {r["model"]: r for r in await rows(mgr)}
        assert by_model["m"]["error"] == "the model server answered 404: 404: Not Found"
        assert by_model["broken"]["stream"] is True
        assert "exited with code 3" in by_model["broken"]["error"]
        await mgr.post("/api/models/stop-all")


async def test_the_log_tells_of_a_process_an_earlier_run_left(tmp_path: Path) -> None:
    orphan = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        run_dir = tmp_path / "data" / "run"
        run_dir.mkdir(parents=True)
        created = psutil.Process(orphan.pid).create_time()
        record = {"m": {"pid": orphan.pid, "pgid": orphan.pid, "create_time": created}}
        (run_dir / "processes.json").write_text(json.dumps(record))
        models = {"m": {"schemes": {"CPU": {"command": fake_command()}}}}
        async with running_manager(make_config(tmp_path, models)) as mgr:
            m = mgr.supervisor.resolve("m")
            messages = [x.message for x in m.log.lines()]
            assert any(
                f"earlier run ended without stopping this model; its process {orphan.pid}" in x
                for x in messages
            ), messages
            assert m.state is State.STOPPED
        assert orphan.wait(timeout=10) < 0
    finally:
        if orphan.poll() is None:
            orphan.kill()
