"""The floor of any relay written in Python on uvloop, for benchmarks/stream_cost.py.

Each client connection gets its own connection to the backend, and bytes are copied
between the two as they come, both ways: no HTTP parsed, nothing checked, recorded or
pooled, no backpressure. Nobody should run it as a proxy; it shows what the event loop and
the interpreter cost per token event before a relay's own code runs (a read callback and a
write per event). Closing either side closes the other.

    python benchmarks/pipe_relay.py LISTEN_PORT=BACKEND_PORT [...]
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Backend(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        self._client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.transport.close()


class _Client(asyncio.Protocol):
    transport: asyncio.Transport

    def __init__(self, backend_port: int) -> None:
        self._port = backend_port
        self._backend: asyncio.Transport | None = None
        self._early: list[bytes] = []  # what the client sent before the backend answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend, _ = await loop.create_connection(
                lambda: _Backend(self), "127.0.0.1", self._port
            )
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            backend.close()
            return
        self._backend = backend
        if self._early:
            backend.write(b"".join(self._early))
            self._early = []

    def data_received(self, data: bytes) -> None:
        if self._backend is None:
            self._early.append(data)
        else:
            self._backend.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._backend is not None:
            self._backend.close()


async def serve(routes: dict[int, int]) -> None:
    loop = asyncio.get_running_loop()
    for listen, backend in routes.items():
        await loop.create_server(
            lambda port=backend: _Client(port), "127.0.0.1", listen, backlog=1024
        )
    await asyncio.Event().wait()


def main() -> None:
    routes = {}
    for pair in sys.argv[1:]:
        listen, _, backend = pair.partition("=")
        routes[int(listen)] = int(backend)
    if not routes:
        raise SystemExit(__doc__)
    uvloop.run(serve(routes))


if __name__ == "__main__":
    main()
