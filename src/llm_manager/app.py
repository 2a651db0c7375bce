"""Composition root: builds every object, wires them, owns start-up and shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from fastapi import FastAPI, Response
from starlette.middleware.cors import CORSMiddleware

from llm_manager import __version__, settings
from llm_manager.api import devices, errors, events, logs, models, openapi, system, usage
from llm_manager.asgi import Dispatcher
from llm_manager.auth import KeyCheck
from llm_manager.cluster.nodes import Cluster
from llm_manager.cluster.replica import ControllerLink, ReplicaSupervisor
from llm_manager.config import ClusterConfig, DeviceConfig, LoadedConfig
from llm_manager.devices.amd import AmdProvider
from llm_manager.devices.base import DeviceProvider
from llm_manager.devices.cluster import ClusterProvider
from llm_manager.devices.cpu import CpuProvider
from llm_manager.devices.cuda import CudaProvider
from llm_manager.devices.monitor import DeviceMonitor
from llm_manager.devices.static import StaticProvider
from llm_manager.errors import ManagerError
from llm_manager.gateway.forward import Gateway, GatewaySettings, Receive, Scope, Send
from llm_manager.gateway.upstream import UpstreamPool
from llm_manager.logs import LogBook, LogSettings
from llm_manager.messages import Messages
from llm_manager.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llm_manager.metrics import Metrics
from llm_manager.models.runtime import probe_session
from llm_manager.models.supervisor import Supervisor
from llm_manager.ollama.facade import OllamaFacade
from llm_manager.reload import Reloader
from llm_manager.store.db import for_store
from llm_manager.store.footprints import FootprintStore
from llm_manager.store.logs import LogStore
from llm_manager.store.usage import RequestRecord, UsageStore
from llm_manager.web import serve as web
from llm_manager.web_guard import WebGuard


class Application:
    """One running manager. Build it inside the event loop (``await Application.create``)."""

    def __init__(
        self,
        loaded: LoadedConfig,
        http: aiohttp.ClientSession,
        overrides: dict[str, object] | None = None,
        watch: bool = False,
        cluster: Cluster | None = None,
        link: ControllerLink | None = None,
    ) -> None:
        config = loaded.config
        server = config.server
        self.cluster = cluster
        self.loaded = loaded
        self.http = http
        # The relay's own client (forwarding only); its idle keep-alive (4 s) stays below
        # llama.cpp's (5 s), so a connection is dropped before the engine drops it.
        self.upstream = UpstreamPool(idle_timeout=4.0)
        self.monitor = DeviceMonitor(
            providers(config.devices) if cluster is None else [ClusterProvider(cluster)]
        )
        self.db = for_store(config.store, server.data_dir)
        self.usage = UsageStore(self.db)
        self.logbook = LogBook(
            LogStore(self.db),
            LogSettings.of(server),
        )
        self.replica = link is not None  # a gateway replica: docs/replicas.md
        self.supervisor: Supervisor
        if link is not None:
            self.supervisor = ReplicaSupervisor(
                loaded,
                self.monitor,
                http,
                self.logbook,
                FootprintStore(self.db),
                cluster,
                link=link,
            )
        else:
            self.supervisor = Supervisor(
                loaded, self.monitor, http, self.logbook, FootprintStore(self.db), cluster
            )
        self.metrics = Metrics(self.supervisor, self.monitor)
        self.reloader = Reloader(
            loaded,
            lambda: settings.reread(loaded, overrides or {}),
            self.supervisor,
            self.monitor,
        )
        self._watch = watch
        self._tasks: list[asyncio.Task[None]] = []
        self.gateway = Gateway(
            self.supervisor,
            GatewaySettings(
                max_body_bytes=server.max_body_bytes,
                connect_timeout=server.connect_timeout,
                read_timeout=server.read_timeout,
                # LLM-Manager's own keys (either kind) are never the model server's.
                strip_keys=bool(server.api_keys or server.admin_keys),
                stream_keepalive=server.stream_keepalive,
            ),
            upstream=self.upstream,
            record=self._record,
            error=_gateway_error,
        )
        self.management = self._build_management(Messages(server.language))
        keys = KeyCheck(server.api_keys, server.admin_keys)
        guard = WebGuard.from_server(server)  # Host and Origin: docs/security.md
        ollama = None
        if server.ollama_api:  # the Ollama API facade: docs/api.md, "Ollama API"
            ollama = OllamaFacade(
                self.supervisor,
                self.gateway,
                __version__,
                (server.ollama_keep_alive_min, server.ollama_keep_alive_max),
                server.max_body_bytes,
            )
        dispatcher = Dispatcher(self.management, self.gateway, keys, _deny, guard, ollama=ollama)
        self.asgi: Any = dispatcher
        if server.cors_origins:
            self.asgi = CORSMiddleware(
                dispatcher,
                allow_origins=server.cors_origins,
                allow_methods=["*"],
                allow_headers=["authorization", "content-type", "x-api-key"],
                expose_headers=["x-llm-manager-overhead-ms", "retry-after"],
            )

    @classmethod
    async def create(
        cls,
        loaded: LoadedConfig,
        overrides: dict[str, object] | None = None,
        watch: bool = False,
    ) -> Application:
        cluster = await join_cluster(loaded.config.cluster)
        link = None
        if cluster is not None and loaded.config.cluster and loaded.config.cluster.replicas:
            link = await controller_link(cluster, loaded)
        return cls(loaded, probe_session(), overrides, watch, cluster, link)

    def _build_management(self, say: Messages) -> FastAPI:
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
        openapi.install(app)
        app.include_router(
            system.router(self.supervisor, created=int(time.time()), storage=self.db.status)
        )
        app.include_router(models.router(self.supervisor, say))
        app.include_router(usage.router(self.supervisor, self.usage))
        app.include_router(logs.router(self.supervisor, self.logbook, say))
        app.include_router(devices.router(self.supervisor))
        self.events_closing = asyncio.Event()  # set by begin_shutdown: ends /api/events
        app.include_router(events.router(self.supervisor, self.events_closing))
        web.install(app)

        @app.post("/api/config/reload", tags=["system"], summary="Re-read the configuration")
        async def reload_config() -> dict[str, Any]:
            report = await self.reloader.reload()
            return {"success": True, "message": "configuration reloaded", **report}

        @app.get("/metrics", tags=["system"], summary="Prometheus metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

        return app

    async def startup(self) -> None:
        self.loaded.config.server.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.db.open)
        if not self.replica:  # a replica shows the controller's log lines, history included
            await self.logbook.load()
        await self.supervisor.start()
        self._tasks.append(asyncio.create_task(self.logbook.retention_loop(), name="retention"))
        if self._watch:
            self._tasks.append(asyncio.create_task(self.reloader.watch(), name="watch"))

    def _record(self, record: RequestRecord) -> None:
        """Every forwarded request ends here: one row for SQLite, and the counters."""
        self.usage.add(record)
        self.metrics.observe(record)

    def begin_shutdown(self) -> None:
        """Called as soon as a stop is asked for: end the streams that would otherwise hold
        the server's graceful shutdown open (live logs never end by themselves)."""
        self.logbook.close_subscribers()
        self.events_closing.set()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        try:
            await self.supervisor.shutdown()
        finally:
            await self.http.close()
            self.upstream.close()
            await asyncio.to_thread(self.db.close)
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.close)


async def join_cluster(config: ClusterConfig | None) -> Cluster | None:
    """Cluster mode: join the Ray cluster (up to cluster.connect_timeout); None without
    a ``cluster:`` section. ClusterUnavailable says why it could not be joined."""
    if config is None:
        return None
    from llm_manager.cluster import ray_backend  # Ray is the optional `cluster` extra

    try:
        return await asyncio.wait_for(
            asyncio.to_thread(ray_backend.RayCluster.connect, config), config.connect_timeout
        )
    except TimeoutError:
        raise ClusterUnavailable(
            f"the Ray cluster at {config.address} did not answer within "
            f"{config.connect_timeout:g} s (cluster.connect_timeout)"
        ) from None
    except ray_backend.MissingExtra as exc:
        raise ClusterUnavailable(str(exc)) from None
    except Exception as exc:  # Ray's own words: no cluster there, a wrong token...
        raise ClusterUnavailable(
            f"cannot join the Ray cluster at {config.address}: {exc}"
        ) from None


async def controller_link(cluster: Cluster, loaded: LoadedConfig) -> ControllerLink:
    """A gateway replica's line to the cluster's controller, started here if none runs."""
    from llm_manager.cluster.ray_backend import RayCluster

    if not isinstance(cluster, RayCluster):
        raise ClusterUnavailable("gateway replicas need the Ray cluster backend")
    server = loaded.config.server
    label = f"{socket.gethostname()}:{server.port} (pid {os.getpid()})"

    async def find() -> object:
        return await asyncio.to_thread(cluster.controller, loaded)

    try:
        handle = await find()
    except Exception as exc:
        raise ClusterUnavailable(f"cannot reach the cluster's controller: {exc}") from None
    return ControllerLink(handle, label, find)


class ClusterUnavailable(Exception):
    pass


def providers(declared: list[DeviceConfig]) -> list[DeviceProvider]:
    """CPU and NVIDIA always (reported offline where absent, as the seed's shape has both),
    AMD where sysfs shows one, declared devices where there are any."""
    found: list[DeviceProvider] = [CpuProvider(), CudaProvider()]
    amd = AmdProvider()
    if amd.present():
        found.append(amd)
    if declared:
        found.append(StaticProvider(declared))
    return found


async def _deny(scope: Scope, receive: Receive, send: Send, management: bool) -> None:
    path = scope["path"]
    response = errors.error_response(
        path,
        401,
        "missing or invalid API key",
        "send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
        kind="authentication_error",
        headers={"WWW-Authenticate": "Bearer"},
        openai=None if management else True,
    )
    await response(scope, receive, send)


async def _gateway_error(scope: Scope, receive: Receive, send: Send, exc: ManagerError) -> None:
    # Whatever the path (/rerank, /completions...), forwarded requests are OpenAI-style.
    await errors.from_error(scope["path"], exc, openai=True)(scope, receive, send)
