"""Soak: many requests (100,000 by default) against `llm-manager serve` as a real process,
streaming and not, over three models that unload when idle and start again.

Opt-in: ``pytest -m soak tests/test_soak.py -s`` (SOAK_REQUESTS sets the count). Checks that
nothing grows without bound (RSS, open file descriptors), that every request is answered
200 and recorded once, and that a SIGTERM at the end leaves no process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import alive, fake_command, read_pids
from tests.test_server_process import Manager, launch, write_config

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "100000"))
CONCURRENCY = 16
PHASES = 3  # load, pause until every model has unloaded, load...
IDLE_TIMEOUT = 2.0
MODELS = ("chat-a", "chat-b", "embed")
CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}]}

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> dict[str, str]:
    """Open file descriptors: number -> what they point at (socket:[inode], a path...)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def request_for(i: int) -> tuple[str, dict[str, Any], bool]:
    """Request ``i``: chat-a and chat-b alternate streaming and not; embed is never streamed."""
    model = MODELS[i % len(MODELS)]
    if model == "embed":
        return "/v1/embeddings", {"model": model, "input": ["a", "b"]}, False
    stream = (i // len(MODELS)) % 2 == 0
    return "/v1/chat/completions", {"model": model, **CHAT_BODY, "stream": stream}, stream


async def one_request(http: aiohttp.ClientSession, url: str, i: int) -> str | None:
    """None when the answer is complete and 200, else what went wrong."""
    path, body, stream = request_for(i)
    async with http.post(url + path, json=body) as resp:
        data = await resp.read()
    if resp.status != 200:
        return f"#{i} {path} {body['model']}: {resp.status} {data[:200]!r}"
    if stream and not data.endswith(b"data: [DONE]\n\n"):
        return f"#{i} stream cut short: {data[-200:]!r}"
    if not stream and not json.loads(data).get("usage"):
        return f"#{i} no usage: {data[:200]!r}"
    return None


async def load(url: str, first: int, last: int, errors: list[str]) -> None:
    """Requests first..last-1 from CONCURRENCY workers sharing one counter."""
    counter = iter(range(first, last))
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def worker() -> None:
            for i in counter:
                problem = await one_request(http, url, i)
                if problem:
                    errors.append(problem)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def wait_all_unloaded(m: Manager, timeout: float = 30) -> float:
    """Wait until every model is ``stopped`` (not merely not running: a ``stopping`` model
    still holds its pipes); returns how long that took."""
    began = time.monotonic()
    while True:
        info = await asyncio.to_thread(m.get, "/api/models/all-models/info")
        if all(model["status"] == "stopped" for model in info["models"].values()):
            return time.monotonic() - began
        assert time.monotonic() - began < timeout, info
        await asyncio.sleep(0.2)


async def test_soak_many_requests_idle_unloads_no_leaks(tmp_path: Path, spawn_log: Path) -> None:
    models = {
        name: {
            "schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}},
            **({"mode": "embedding"} if name == "embed" else {}),
        }
        for name in MODELS
    }
    config = write_config(tmp_path, models, idle_timeout=f"{IDLE_TIMEOUT}s")
    m = launch(config, tmp_path)
    pid = m.proc.pid
    try:
        await asyncio.to_thread(m.get, "/health")
        rss_start, fds_start = rss_mib(pid), fds(pid)
        errors: list[str] = []
        bounds = [REQUESTS * k // PHASES for k in range(PHASES + 1)]
        began = time.monotonic()
        paused = 0.0
        rss_warm = 0.0
        for phase in range(PHASES):
            await load(m.url, bounds[phase], bounds[phase + 1], errors)
            assert not errors, errors[:5]
            if phase == 0:
                rss_warm = rss_mib(pid)
            # Pause: every model unloads for being idle; the next phase starts them again.
            paused += await wait_all_unloaded(m)
        duration = time.monotonic() - began
        rss_end, fds_end = rss_mib(pid), fds(pid)  # no model running, no client
        spawns = read_pids(spawn_log)

        m.proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(m.proc.wait, 60)
    finally:
        if m.proc.poll() is None:
            m.proc.kill()
            m.proc.wait()
    assert code == 0, m.log.read_text()[-3000:]
    assert not any(alive(p) for p in read_pids(spawn_log))

    db = sqlite3.connect(tmp_path / "data" / "llm-manager.db")
    try:
        rows = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        not_ok = db.execute("SELECT COUNT(*) FROM requests WHERE status != 200").fetchone()[0]
        streamed = db.execute("SELECT COUNT(*) FROM requests WHERE stream").fetchone()[0]
    finally:
        db.close()

    print(
        f"\nsoak: {REQUESTS} requests in {duration:.1f} s ({REQUESTS / duration:.0f}/s, "
        f"incl. {paused:.1f} s of idle pauses); RSS start {rss_start:.1f} MiB, "
        f"after phase 1 {rss_warm:.1f} MiB, end {rss_end:.1f} MiB; "
        f"fds start {len(fds_start)}, end {len(fds_end)}; rows {rows} ({streamed} streamed, "
        f"{not_ok} not 200); model starts {len(spawns)}; manager exit {code}"
    )
    assert rows == REQUESTS and not_ok == 0
    expected_streams = sum(1 for i in range(REQUESTS) if request_for(i)[2])
    assert streamed == expected_streams
    assert len(spawns) == len(MODELS) * PHASES  # every phase started every model once
    assert len(fds_end) <= len(fds_start) + 5, (fds_start, fds_end)
    # The first phase's growth (pools, caches, allocator) is expected; after it, flat.
    assert rss_end - rss_warm < 50, (rss_warm, rss_end)
