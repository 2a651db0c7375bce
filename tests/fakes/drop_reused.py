"""A model server that closes every keep-alive connection when it is reused, without an
answer: the worst case of what llama.cpp's server does to a client's pooled connections.

Each connection serves exactly one request (with ``Connection: keep-alive`` announced), then
drops the connection the moment a second request arrives on it.
"""

from __future__ import annotations

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    served = 0
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            if served:
                print("dropped a reused connection", flush=True)
                writer.transport.abort()
                return
            body = b'{"ok": true, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Keep-Alive: timeout=5, max=100\r\nConnection: keep-alive\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            await writer.drain()
            served += 1
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
