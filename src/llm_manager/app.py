"""Composition root: builds every object, wires them, owns start-up and shutdown."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI

from llm_manager import __version__
from llm_manager.api import errors, models, system
from llm_manager.config import LoadedConfig
from llm_manager.devices.cpu import CpuProvider
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.devices.static import StaticProvider
from llm_manager.messages import Messages
from llm_manager.models.supervisor import Supervisor


class Application:
    """One running manager. Build it inside the event loop (``await Application.create``)."""

    def __init__(self, loaded: LoadedConfig, http: aiohttp.ClientSession) -> None:
        config = loaded.config
        self.loaded = loaded
        self.http = http
        self.monitor = DeviceMonitor([CpuProvider(), StaticProvider(config.devices)])
        self.supervisor = Supervisor(loaded, self.monitor, http)
        self.asgi = self._build_asgi(Messages(config.server.language))

    @classmethod
    async def create(cls, loaded: LoadedConfig) -> Application:
        # Health probes and (later) forwarding share one pool; no total timeout here,
        # each call sets its own.
        http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
        )
        return cls(loaded, http)

    def _build_asgi(self, say: Messages) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            await self.startup()
            try:
                yield
            finally:
                await self.shutdown()

        app = FastAPI(
            title="LLM-Manager",
            version=__version__,
            description="Local model manager and OpenAI-compatible gateway.",
            lifespan=lifespan,
        )
        errors.install(app)
        app.include_router(system.router(self.supervisor, created=int(time.time())))
        app.include_router(models.router(self.supervisor, say))
        return app

    async def startup(self) -> None:
        self.loaded.config.server.data_dir.mkdir(parents=True, exist_ok=True)
        await self.supervisor.start()

    async def shutdown(self) -> None:
        try:
            await self.supervisor.shutdown()
        finally:
            await self.http.close()
