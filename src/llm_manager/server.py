"""Running the HTTP server: our own socket, our own signal handling, exit status 0.

uvicorn's own signal capture re-raises SIGTERM after shutdown, which makes the process
exit with -15; a manager asked to stop is not a failure, so signals are handled here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable, Generator
from contextlib import contextmanager

import uvicorn

from llm_manager import allocator, quickstart, runurl
from llm_manager.app import Application
from llm_manager.config import LoadedConfig
from llm_manager.http_protocol import HttpProtocol
from llm_manager.settings import BUILTIN_SOURCE

log = logging.getLogger("llm_manager")


class EarlySignals:
    """Records SIGINT/SIGTERM that arrive before the server's own handlers are in place
    (while the config loads and the app is built), so that they still end in a clean
    shutdown with exit status 0 instead of the default death by signal; and a SIGHUP, so
    that a reload asked in that moment (the "listening" line is logged before the handlers
    are in place) is done once they are, not lost."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.reload_asked = False

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._record)
        signal.signal(signal.SIGHUP, self._record_reload)

    def _record(self, signum: int, _frame: object) -> None:
        self.received.append(signum)

    def _record_reload(self, _signum: int, _frame: object) -> None:
        self.reload_asked = True


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        early: EarlySignals | None,
        on_exit: Callable[[], None] | None = None,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._early = early
        self._on_exit = on_exit
        self._on_reload = on_reload

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            # Only record the request; uvicorn's main loop acts on it.
            log.info("received %s: shutting down", sig.name)
            if self.should_exit and sig is signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            if self._on_exit is not None:
                self._on_exit()

        sigs: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, on_signal, sig)
        if self._on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)
            sigs += (signal.SIGHUP,)
        if self._early is not None and self._early.received:
            on_signal(signal.Signals(self._early.received[0]))
        elif self._early is not None and self._early.reload_asked and self._on_reload:
            self._early.reload_asked = False
            self._on_reload()
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_config(
    app: object,
    log_level: str = "warning",
    graceful_timeout: int | None = None,
    protocol: type[HttpProtocol] = HttpProtocol,
) -> uvicorn.Config:
    """How the manager is served (the tests serve it the same way; ``protocol``: a
    subclass with other limits, for tests)."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        log_level=log_level.lower(),
        access_log=log_level.lower() == "debug",
        loop="none",
        # uvicorn's httptools protocol with a head size limit, read deadlines and no
        # trailers merged into the headers (http_protocol.py).
        http=protocol,
        ws="none",  # nothing here speaks WebSocket
        # Nothing reads the client address, and "server: uvicorn" tells a client nothing:
        # both cost a little on every request.
        proxy_headers=False,
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=graceful_timeout,
        log_config=None,
    )


async def serve(
    loaded: LoadedConfig,
    host: str,
    port: int,
    log_level: str,
    early: EarlySignals | None = None,
    overrides: dict[str, object] | None = None,
    watch: bool = False,
) -> int:
    allocator.tune()  # request bodies' memory used again, not faulted in per request
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    application = await Application.create(loaded, overrides, watch)
    config = uvicorn_config(application.asgi, log_level, int(loaded.config.server.stop_timeout) + 5)

    def reload_on_signal() -> None:
        log.info("received SIGHUP: reloading the configuration")
        task = asyncio.create_task(application.reloader.reload_logged())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    reloads: set[asyncio.Task[None]] = set()
    server = _Server(config, early, application.begin_shutdown, reload_on_signal)
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "LLM-Manager listening on http://%s:%d (OpenAI base URL http://%s:%d/v1)",
        shown,
        actual,
        shown,
        actual,
    )
    if loaded.source == BUILTIN_SOURCE:
        for line in quickstart.banner(loaded.config, f"http://{shown}:{actual}").splitlines():
            log.info("%s", line)
    # Lets `llm-manager models` (and the other client commands) find this server.
    data_dir = loaded.config.server.data_dir
    runurl.write(data_dir, runurl.client_url(host, actual))
    try:
        await server.serve(sockets=[sock])
    finally:
        runurl.remove(data_dir)
    if early is not None and early.received and not server.started:
        return 0  # asked to stop before it had started: not a failure
    return 0 if server.started else 1
