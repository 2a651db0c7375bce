"""A model server that writes exact bytes, each scenario one way an engine breaks the rules of
an HTTP/1.1 exchange; run by the manager as a model (tests/test_relay_raw.py)::

    python raw_engine.py PORT LOG SCENARIO

Every request is logged to LOG (JSON lines) before it is answered, body included (hex), so
that a test can tell exactly what the engine received and how often::

    {"event": "request", "conn": 3, "seq": 0, "method": "POST", "path": "/v1/...",
     "headers": [["Host", "127.0.0.1:8001"], ...], "body": "7b..."}
    {"event": "eof", "conn": 3}        the client closed connection 3
    {"event": "closed", "conn": 3}     the engine closed connection 3 (or reset it)

``conn`` numbers the accepted connections from 1, ``seq`` the model requests on one. A
model request is answered with JSON naming the request it answers (``answer_to``: the
request body's ``id``, or the method and path), ``conn`` and ``seq``. GET /health (the
manager's readiness probe) answers 200 and closes, and is not logged.

Scenarios (``seq`` is the index of a model request on its connection):

- ``plain``: every request is answered, as the rules say (the client side's battery,
  tests/test_http_conformance.py, checks what reaches the engine).
- ``unsolicited``: after its first answer, a connection gets a second, unasked-for answer
  (``{"late": true}``) 0.2 s later, while it is idle.
- ``two-in-one``: the first answer on a connection is followed, in the same write, by a
  second one (``{"extra": true}``).
- ``close-after-read`` / ``reset-after-read``: a connection answers its first request; it
  reads the next one whole, logs it, and closes (FIN) or resets (RST) without answering.
- ``connection-close``: answers say ``Connection: close`` but the engine keeps the
  connection open.
- ``keep-alive-limits``: answers say ``Keep-Alive: timeout=1, max=2``; the engine does not
  enforce it.
- ``idle-close``: the engine closes a connection 0.2 s after each answer.
- ``te-notchunked``: the answer says ``Transfer-Encoding: gzip-notchunked`` (not chunked:
  the body ends with the connection) and its body looks like chunks.
- ``bodiless``: answers without a body that carry a Content-Length anyway: ``/status/204``
  and ``/status/304`` (with ``Connection: x-hop`` naming a header ``X-Hop`` that must not
  be relayed), and any HEAD request (200, ``Content-Length: 10``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from pathlib import Path
from typing import Any

SCENARIOS = (
    "plain",
    "unsolicited",
    "two-in-one",
    "close-after-read",
    "reset-after-read",
    "connection-close",
    "keep-alive-limits",
    "idle-close",
    "te-notchunked",
    "bodiless",
    "flood",
)
FLOOD_BYTES = 64 << 20  # what the flood scenario streams, in events of FLOOD_EVENT bytes
FLOOD_EVENT = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
NOT_CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"  # what te-notchunked sends after its headers


def answer(payload: dict[str, Any], *headers: bytes) -> bytes:
    body = json.dumps(payload).encode()
    head = [b"HTTP/1.1 200 OK", b"Content-Type: application/json", *headers]
    head.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class Engine:
    def __init__(self, log: Path, scenario: str) -> None:
        if scenario not in SCENARIOS:
            raise SystemExit(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
        self.log = log.open("a", buffering=1)
        self.scenario = scenario
        self.accepted = 0

    def record(self, **event: Any) -> None:
        self.log.write(json.dumps(event) + "\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = self.accepted
        seq = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path = head.split(b" ", 2)[:2]
                size = 0
                headers = []
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if line:
                        headers.append([name.decode("latin-1"), value.strip().decode("latin-1")])
                    if name.strip().lower() == b"content-length":
                        size = int(value)
                body = await reader.readexactly(size) if size else b""
                if path == b"/health":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
                    )
                    await writer.drain()
                    writer.close()
                    return
                self.record(
                    event="request",
                    conn=conn,
                    seq=seq,
                    method=method.decode(),
                    path=path.decode(),
                    headers=headers,
                    body=body.hex(),
                )
                if not await self.respond(writer, conn, seq, method, path, body):
                    self.record(event="closed", conn=conn)
                    return
                seq += 1
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                self.record(event="eof", conn=conn)
            writer.close()
        except ConnectionError:
            self.record(event="eof", conn=conn)
            writer.close()

    async def respond(
        self,
        writer: asyncio.StreamWriter,
        conn: int,
        seq: int,
        method: bytes,
        path: bytes,
        body: bytes,
    ) -> bool:
        """Answers one request; False when the engine closed the connection."""
        try:
            answer_to = json.loads(body)["id"] if body else f"{method.decode()} {path.decode()}"
        except (ValueError, KeyError, TypeError):
            answer_to = None
        payload = {"answer_to": answer_to, "conn": conn, "seq": seq}
        scenario = self.scenario
        if scenario in ("close-after-read", "reset-after-read") and seq >= 1:
            if scenario == "reset-after-read":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()
            return False
        if scenario == "te-notchunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: gzip-notchunked\r\n\r\n" + NOT_CHUNKED_BODY
            )
            await writer.drain()
            writer.close()
            return False
        if scenario == "flood":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            sent = 0
            frame = b"%x\r\n" % len(FLOOD_EVENT) + FLOOD_EVENT + b"\r\n"
            while sent < FLOOD_BYTES:
                writer.write(frame)
                await writer.drain()  # blocks while the relay is not reading
                sent += len(FLOOD_EVENT)
                if sent % (4 << 20) == 0:
                    self.record(event="sent", conn=conn, bytes=sent)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        if scenario == "bodiless":
            status = {b"/status/204": b"204 No Content", b"/status/304": b"304 Not Modified"}
            line = b"200 OK" if method == b"HEAD" else status.get(path.split(b"?")[0], b"200 OK")
            writer.write(
                b"HTTP/1.1 " + line + b"\r\nContent-Length: 10\r\nX-Hop: hop"
                b"\r\nConnection: x-hop\r\nX-Kept: kept\r\n\r\n"
            )
            await writer.drain()
            return True
        headers: tuple[bytes, ...] = ()
        if scenario == "connection-close":
            headers = (b"Connection: close",)
        elif scenario == "keep-alive-limits":
            headers = (b"Connection: keep-alive", b"Keep-Alive: timeout=1, max=2")
        data = answer(payload, *headers)
        if scenario == "two-in-one" and seq == 0:
            data += answer({"extra": True})
        writer.write(data)
        await writer.drain()
        if scenario == "unsolicited" and seq == 0:
            await asyncio.sleep(0.2)
            writer.write(answer({"late": True}))
            await writer.drain()
        elif scenario == "idle-close":
            await asyncio.sleep(0.2)
            writer.close()
            return False
        return True


async def main(port: int, log: Path, scenario: str) -> None:
    engine = Engine(log, scenario)
    server = await asyncio.start_server(engine.handle, "127.0.0.1", port)
    print(f"raw engine ({scenario}) on port {port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]))
