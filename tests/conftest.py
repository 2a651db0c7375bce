"""Shared fixtures: a real manager on a real port (port 0) and the fake model server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
import uvicorn
import yaml

from llm_manager.app import Application
from llm_manager.config import LoadedConfig, parse_text
from llm_manager.http_protocol import HttpProtocol
from llm_manager.server import bind, uvicorn_config

FAKE_SERVER = Path(__file__).parent / "fakes" / "fake_model_server.py"


def fake_command(*switches: str) -> list[str]:
    """The command line of a fake model server, for a scheme's ``command``."""
    return [sys.executable, str(FAKE_SERVER), "--port", "{port}", "--name", "{name}", *switches]


def read_pids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().split()]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def make_config(tmp_path: Path, models: dict[str, Any], **server: Any) -> LoadedConfig:
    data: dict[str, Any] = {
        "server": {"data_dir": str(tmp_path / "data"), "stop_timeout": "2s", **server},
        "models": models,
    }
    devices = server.pop("devices", None)
    if devices is not None:
        data["server"].pop("devices", None)
        data["devices"] = devices
    text = yaml.safe_dump(data, sort_keys=False)  # order matters: schemes, device keys
    return LoadedConfig(parse_text(text, "test"), "test", tmp_path)


@dataclass
class RunningManager:
    app: Application
    url: str
    http: aiohttp.ClientSession

    @property
    def supervisor(self) -> Any:
        return self.app.supervisor

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.url + path) as resp:
            return resp.status, await resp.json(content_type=None)

    async def post(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.http.post(self.url + path, **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)


class _QuietServer(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()  # the test runner keeps its own signal handling


@contextlib.asynccontextmanager
async def running_manager(
    loaded: LoadedConfig, protocol: type[HttpProtocol] = HttpProtocol
) -> AsyncIterator[RunningManager]:
    """The whole app served by uvicorn on 127.0.0.1:0 inside the test's event loop."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    application = await Application.create(loaded)
    config = uvicorn_config(application.asgi, protocol=protocol)
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until(lambda: server.started or task.done())
    if task.done():
        task.result()
    try:
        async with aiohttp.ClientSession() as http:
            yield RunningManager(application, f"http://127.0.0.1:{port}", http)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Tiny random-weight GGUF models (chat, embedding, reranker), written once per run."""
    pytest.importorskip("gguf", reason="needs the gguf package to write test models")
    from tests.models.gguf_factory import write_all

    return write_all(tmp_path_factory.mktemp("gguf"))


@pytest.fixture
def spawn_log(tmp_path: Path) -> Iterator[Path]:
    """A file the fake servers record their PIDs in; at the end none may be alive."""
    path = tmp_path / "spawns.log"
    yield path
    leftovers = [
        pid
        for p in (path, path.with_name(path.name + ".grandchild"))
        for pid in read_pids(p)
        if alive(pid)
    ]
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"model processes left behind: {leftovers}"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A real PostgreSQL server for the session (tests/postgres_server.py)."""
    pytest.importorskip("psycopg", reason="needs psycopg (the postgres extra)")
    from tests.postgres_server import PostgresServer, binaries

    bindir = binaries()
    if bindir is None:
        pytest.skip("needs PostgreSQL's server binaries (Debian: apt-get install postgresql)")
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
