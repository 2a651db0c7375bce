"""The floor for a relay written in Python: raw ASGI on uvicorn (uvloop, httptools) and an
aiohttp client; no routing, no checks, no records.

    python benchmarks/minimal_relay.py LISTEN_PORT=BACKEND_URL [LISTEN_PORT=BACKEND_URL ...]

One process listens on every LISTEN_PORT and relays each request, as it is, to the backend
paired with the port it came in on (so one PID carries the relay's CPU for every backend).
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import aiohttp
import uvicorn

routes: dict[int, str] = {}
state: dict[str, aiohttp.ClientSession] = {}


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            state["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            await send({"type": "lifespan.startup.complete"})
        else:
            await state["http"].close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    url = routes[scope["server"][1]] + scope["path"]
    headers = {"Content-Type": "application/json"}
    for attempt in range(5):  # a kept-alive connection the backend closed: send again
        try:
            upstream = await state["http"].request(scope["method"], url, data=body, headers=headers)
            break
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if attempt == 4:
                raise
    async with upstream as r:
        out = [(k.lower(), v) for k, v in r.raw_headers if k.lower() != b"transfer-encoding"]
        await send({"type": "http.response.start", "status": r.status, "headers": out})
        async for chunk in r.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def main() -> None:
    sockets = []
    for pair in sys.argv[1:]:
        port, backend = pair.split("=", 1)
        routes[int(port)] = backend.rstrip("/")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(port)))
        sockets.append(sock)
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", log_level="warning", access_log=False
    )
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
