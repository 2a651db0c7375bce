"""The client side of the forwarding route, byte by byte: what the manager's HTTP server
(uvicorn's httptools protocol with the limits of http_protocol.py) answers to requests that
break or stretch HTTP/1.1, and what reaches the model server (tests/fakes/raw_engine.py,
which logs every request it reads, headers and body).

Every shape that could smuggle a request (two framings, folded or broken lines, NUL) is
refused with 400 before the app runs, nothing of it reaches the engine, and the server keeps
serving. Heads over the limit get 431, slow heads 408, stalled bodies a closed connection;
trailer fields never become headers; pipelined, HTTP/1.0 and 100-continue requests are
answered as uvicorn answers them; a client that stops reading holds the engine back. Clients
that leave while waiting or mid-answer are covered by test_gateway.py, the upstream
client's own backpressure by test_upstream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llm_manager.http_protocol import MAX_HEAD_BYTES, HttpProtocol
from tests.conftest import RunningManager, make_config, running_manager
from tests.fakes.raw_engine import FLOOD_BYTES, FLOOD_EVENT
from tests.test_relay_raw import events, raw_model, received

BODY = b'{"model": "m", "id": "%s"}'
HOST = b"Host: 127.0.0.1\r\n"

LINE = b"POST /v1/chat/completions HTTP/1.1\r\n"


def raw(fields: bytes, body: bytes, line: bytes = LINE) -> bytes:
    """A request with these header lines (each ending in CRLF) after Host, as it is."""
    return line + HOST + fields + b"\r\n" + body


def post(name: str, headers: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    body = BODY % name.encode()
    line = b"POST /v1/chat/completions " + version + b"\r\n"
    return raw(headers + b"Content-Length: %d\r\n" % len(body), body, line)


def chunked(head: bytes, body: bytes, after: bytes = b"0\r\n\r\n") -> bytes:
    return head + b"%x\r\n" % len(body) + body + b"\r\n" + after


class Quick(HttpProtocol):
    """Short deadlines, for the tests that wait for them."""

    head_timeout = 1.0
    body_timeout = 1.0


@contextlib.asynccontextmanager
async def engine_behind(
    tmp_path: Path, protocol: type[HttpProtocol] = HttpProtocol, scenario: str = "plain"
) -> AsyncIterator[tuple[RunningManager, Path]]:
    models, log = raw_model(tmp_path, scenario)
    async with running_manager(make_config(tmp_path, models), protocol=protocol) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        yield mgr, log


class Client:
    """One raw TCP connection to the manager."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, mgr: RunningManager) -> Client:
        host, port = mgr.url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        """One answer: status, headers (lower-case names), body (by Content-Length)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        return status, headers, body

    async def closed(self, timeout: float = 10) -> bool:
        """True when the server closes the connection (EOF or reset) within ``timeout``."""
        try:
            rest = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return rest == b"" or await self.closed(timeout)

    def close(self) -> None:
        self.writer.close()


async def trickle(client: Client, data: bytes, pause: float) -> None:
    """Sends ``data`` a byte at a time, until it is all sent or the server closes."""
    for i in range(len(data)):
        try:
            await client.send(data[i : i + 1])
        except ConnectionError:
            return
        await asyncio.sleep(pause)


async def exchange(mgr: RunningManager, data: bytes) -> tuple[int, dict[str, str], bytes]:
    client = await Client.open(mgr)
    try:
        await client.send(data)
        return await client.answer()
    finally:
        client.close()


async def still_serving(mgr: RunningManager, log: Path) -> None:
    status, _, body = await exchange(mgr, post("after"))
    assert status == 200 and json.loads(body)["answer_to"] == "after"
    assert received(log)[-1]["body"] == (BODY % b"after").hex()


def ident(name: bytes) -> bytes:
    return BODY % name


CHUNKED = b"Transfer-Encoding: chunked\r\n"
REFUSED = {
    "Content-Length and Transfer-Encoding": raw(
        b"Content-Length: 4\r\n" + CHUNKED, chunked(b"", ident(b"cl-te"))
    ),
    "Transfer-Encoding then Content-Length": raw(
        CHUNKED + b"Content-Length: 4\r\n", chunked(b"", ident(b"te-cl"))
    ),
    "two different Content-Lengths": raw(
        b"Content-Length: 26\r\nContent-Length: 5\r\n", ident(b"two")
    ),
    "Transfer-Encoding not ending in chunked": raw(
        b"Transfer-Encoding: chunked, identity\r\n", ident(b"te")
    ),
    "unknown Transfer-Encoding": raw(b"Transfer-Encoding: xchunked\r\n", ident(b"tx")),
    "obs-fold": raw(b"X-A: a\r\n folded\r\nContent-Length: 28\r\n", ident(b"fold")),
    "bare LF line ends": b"POST /v1/chat/completions HTTP/1.1\nHost: 127.0.0.1\n"
    b"Content-Length: 26\n\n" + ident(b"lf"),
    "bare CR in the request line": raw(
        b"Content-Length: 26\r\n", ident(b"cr"), b"POST /v1/chat/completions HTTP/1.1\r"
    ),
    "CR inside a value": raw(b"X-A: a\rb\r\nContent-Length: 26\r\n", ident(b"cv")),
    "NUL inside a value": raw(b"X-A: a\x00b\r\nContent-Length: 26\r\n", ident(b"nv")),
    "NUL in the target": raw(
        b"Content-Length: 26\r\n", ident(b"np"), b"POST /v1/chat\x00/completions HTTP/1.1\r\n"
    ),
    "space before the colon": raw(b"Content-Length : 26\r\n", ident(b"sc")),
    "negative Content-Length": raw(b"Content-Length: -1\r\n", ident(b"cn")),
    "signed Content-Length": raw(b"Content-Length: +26\r\n", ident(b"c+")),
    "chunk size not hex": raw(CHUNKED, b"zz\r\n" + ident(b"cb") + b"\r\n0\r\n\r\n"),
    "chunk size overflowing": raw(
        CHUNKED, b"ffffffffffffffffff\r\n" + ident(b"ch") + b"\r\n0\r\n\r\n"
    ),
    "unknown HTTP version": raw(
        b"Content-Length: 26\r\n", ident(b"bv"), b"POST /v1/chat/completions HTTP/2.7\r\n"
    ),
    "lower-case method": raw(
        b"Content-Length: 26\r\n", ident(b"ml"), b"post /v1/chat/completions HTTP/1.1\r\n"
    ),
    "Content-Length as a trailer field": raw(
        CHUNKED, chunked(b"", ident(b"tc"), b"0\r\nContent-Length: 1\r\n\r\n")
    ),
    "a TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


async def test_malformed_and_ambiguous_requests_get_400_and_never_reach_the_engine(
    tmp_path: Path,
) -> None:
    async with engine_behind(tmp_path) as (mgr, log):
        for name, data in REFUSED.items():
            client = await Client.open(mgr)
            await client.send(data)
            status, headers, _ = await client.answer()
            assert (status, headers.get("connection")) == (400, "close"), name
            assert await client.closed(), name
            client.close()
        assert received(log) == []
        await still_serving(mgr, log)


async def test_trailer_fields_are_dropped_never_forwarded_as_headers(tmp_path: Path) -> None:
    head = raw(CHUNKED, b"")
    trailers = b"0\r\nX-Trailer: t\r\nAuthorization: Bearer smuggled\r\n\r\n"
    body = ident(b"tr")
    # A chunk extension, and the body in two chunks: the engine gets it joined, sized.
    data = head + b'5;ext=1;q="x"\r\n' + body[:5] + b"\r\n" + chunked(b"", body[5:], trailers)
    async with engine_behind(tmp_path) as (mgr, log):
        status, _, answer = await exchange(mgr, data)
        assert status == 200 and json.loads(answer)["answer_to"] == "tr"
        [request] = received(log)
        assert request["body"] == body.hex()
        names = [name.lower() for name, _ in request["headers"]]
        assert "x-trailer" not in names and "authorization" not in names
        assert dict(request["headers"])["content-length"] == str(len(body))


async def test_a_head_over_the_limit_gets_431_and_never_reaches_the_engine(
    tmp_path: Path,
) -> None:
    async with engine_behind(tmp_path) as (mgr, log):
        # Many fields under the limit pass, and reach the engine.
        fields = b"".join(b"X-F%d: v\r\n" % i for i in range(500))
        status, _, _ = await exchange(mgr, post("many", fields))
        assert status == 200
        assert sum(n.startswith("x-f") for n, _ in received(log)[-1]["headers"]) == 500
        # Over it: in one write (the head complete in one read), in one 1 MiB write, and
        # sent in pieces that never complete the head.
        big = b"X-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n"
        for data in (post("big", big), post("huge", big * 16)):
            status, headers, body = await exchange(mgr, data)
            assert status == 431 and headers["connection"] == "close"
            assert b"exceed" in body
        client = await Client.open(mgr)
        await client.send(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"X-Slow: ")
        piece = b"b" * 8192
        status = 0
        for _ in range(2 * MAX_HEAD_BYTES // len(piece)):
            try:
                await client.send(piece)
            except ConnectionError:
                break  # refused: the rest was not wanted
            await asyncio.sleep(0.01)
        status, _, _ = await client.answer()
        assert status == 431
        client.close()
        assert [r["body"] for r in received(log)] == [(BODY % b"many").hex()]
        await still_serving(mgr, log)


async def test_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async with engine_behind(tmp_path) as (mgr, log):
        client = await Client.open(mgr)
        await client.send(post("p1") + post("p2") + post("p3"))
        answers = [json.loads((await client.answer())[2])["answer_to"] for _ in range(3)]
        assert answers == ["p1", "p2", "p3"]
        client.close()
        assert [bytes.fromhex(r["body"]) for r in received(log)] == [
            BODY % b"p1",
            BODY % b"p2",
            BODY % b"p3",
        ]


async def test_expect_100_continue(tmp_path: Path) -> None:
    body = BODY % b"e1"
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    async with engine_behind(tmp_path) as (mgr, log):
        client = await Client.open(mgr)
        await client.send(head)
        interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await client.send(body)
        status, _, answer = await client.answer()
        assert status == 200 and json.loads(answer)["answer_to"] == "e1"
        client.close()
        # The relay read the body itself: the engine is not asked to say 100 Continue.
        assert "expect" not in [n.lower() for n, _ in received(log)[0]["headers"]]


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http_1_0_is_answered_and_closed(tmp_path: Path, keep_alive: bool) -> None:
    extra = b"Connection: keep-alive\r\n" if keep_alive else b""
    async with engine_behind(tmp_path) as (mgr, log):
        client = await Client.open(mgr)
        await client.send(post("h1", extra, b"HTTP/1.0") + post("h2", extra, b"HTTP/1.0"))
        status, headers, answer = await client.answer()
        assert status == 200 and json.loads(answer)["answer_to"] == "h1"
        # As uvicorn answers HTTP/1.0: one request a connection, even when keep-alive is
        # asked for (a stricter answer than keeping it open would be).
        assert headers["connection"] == "close"
        assert await client.closed()
        client.close()
        assert len(received(log)) == 1


async def test_a_slow_head_gets_408_and_a_silent_connection_is_closed(tmp_path: Path) -> None:
    async with engine_behind(tmp_path, Quick) as (mgr, log):
        silent = await Client.open(mgr)
        began = time.monotonic()
        assert await silent.closed(timeout=5)
        assert time.monotonic() - began < 4
        silent.close()
        # One byte at a time, each in time but the whole head not: the deadline is for
        # the whole head, from its first byte (slowloris).
        slow = await Client.open(mgr)
        began = time.monotonic()
        sender = asyncio.create_task(trickle(slow, post("slow"), 0.05))
        status, headers, body = await slow.answer()
        sender.cancel()
        assert status == 408 and headers["connection"] == "close"
        assert time.monotonic() - began < 4
        slow.close()
        assert received(log) == []
        await still_serving(mgr, log)


async def test_a_stalled_body_closes_the_connection_a_slow_one_does_not(
    tmp_path: Path,
) -> None:
    body = BODY % b"slow-body"
    head = b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n"
    async with engine_behind(tmp_path, Quick) as (mgr, log):
        stalled = await Client.open(mgr)
        await stalled.send(head % len(body) + body[:10])
        began = time.monotonic()
        assert await stalled.closed(timeout=5)
        assert time.monotonic() - began < 4
        stalled.close()
        # Slower in all than the deadline, but never idle that long.
        slow = await Client.open(mgr)
        await slow.send(head % len(body))
        for i in range(0, len(body), 4):
            await slow.send(body[i : i + 4])
            await asyncio.sleep(0.15)
        status, _, answer = await slow.answer()
        assert status == 200 and json.loads(answer)["answer_to"] == "slow-body"
        slow.close()
        assert [bytes.fromhex(r["body"]) for r in received(log)] == [body]
        await still_serving(mgr, log)


@pytest.mark.parametrize("cut", ["in the head", "in the body"])
async def test_a_client_leaving_while_sending_costs_nothing(tmp_path: Path, cut: str) -> None:
    data = post("gone")
    at = data.index(b"Content-Length") if cut == "in the head" else len(data) - 5
    async with engine_behind(tmp_path) as (mgr, log):
        client = await Client.open(mgr)
        await client.send(data[:at])
        await asyncio.sleep(0.1)
        client.writer.transport.abort()  # a reset, not a polite close
        await asyncio.sleep(0.2)
        assert received(log) == []
        await still_serving(mgr, log)
        await asyncio.to_thread(mgr.app.db.flush)
        _, rows = await mgr.get("/api/requests?limit=10")
        # Only the request that was whole is a request; the cut one left no record.
        assert [r["status"] for r in rows["requests"]] == [200]


async def test_a_client_that_stops_reading_holds_the_engine_back_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """A slow reader: the engine streams 64 MiB as fast as it can; the client reads the
    head, then nothing for 2 s. The relay must pass the pressure back (the engine blocks)
    instead of buffering the answer, and then deliver every byte."""

    def engine_sent() -> int:
        return max([e["bytes"] for e in events(log) if e["event"] == "sent"], default=0)

    async with engine_behind(tmp_path, scenario="flood") as (mgr, log):
        client = await Client.open(mgr)
        await client.send(post("flood"))
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
        await asyncio.sleep(2)  # reading nothing
        held_at = engine_sent()
        # Socket buffers on both hops hold some megabytes; the rest waits in the engine.
        assert held_at <= FLOOD_BYTES // 2
        size = 0
        last = b""
        while True:
            line = await asyncio.wait_for(client.reader.readuntil(b"\r\n"), 10)
            length = int(line, 16)
            data = await asyncio.wait_for(client.reader.readexactly(length + 2), 10)
            if length == 0:
                break
            size += length
            last = (last + data[:-2])[-len(FLOOD_EVENT) :]
        client.close()
        assert size == FLOOD_BYTES and last == FLOOD_EVENT
        assert engine_sent() == FLOOD_BYTES > held_at
        await asyncio.to_thread(mgr.app.db.flush)
        _, rows = await mgr.get("/api/requests?limit=1")
        assert rows["requests"][0]["status"] == 200 and rows["requests"][0]["error"] is None


async def test_a_websocket_upgrade_is_answered_as_plain_http(tmp_path: Path) -> None:
    upgrade = (
        b"GET /health HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    async with engine_behind(tmp_path) as (mgr, log):
        status, _, body = await exchange(mgr, upgrade)
        assert status == 200 and json.loads(body)["status"] == "healthy"
        await still_serving(mgr, log)
