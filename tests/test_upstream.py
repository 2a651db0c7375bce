"""The relay's HTTP/1.1 client (gateway/upstream.py) against real servers on 127.0.0.1.

Most servers here are raw ``asyncio.start_server`` handlers that write exact bytes, so a
model server's misbehaviour (closing early, stalling, invalid HTTP) can be provoked on
purpose; aiohttp.web stands in where an ordinary server is enough. A few assertions look at
the private state of a connection (``response._conn``): this is the module's own test.

The scenarios run on the default asyncio loop and again on uvloop, which the manager uses
in production (``test_on_uvloop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import select
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httptools
import pytest
import uvloop
from aiohttp import web

from llm_manager.gateway import upstream
from llm_manager.gateway.upstream import (
    ConnectFailed,
    ConnectTimeout,
    ConnState,
    Dropped,
    ReadTimeout,
    Response,
    StateError,
    UpstreamError,
    UpstreamPool,
    idempotent,
    is_chunked,
    keep_alive_params,
    request_head,
)

HOST = "127.0.0.1"


# --- helpers -------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Polls a condition that no event announces (private state of the client)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class Peer:
    """One connection accepted by a RawServer, seen from the server's side."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[bytes] = []
        self.saw_eof = asyncio.Event()

    async def read_request(self) -> bytes:
        head = await self.reader.readuntil(b"\r\n\r\n")
        size = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                size = int(value)
        request = head + (await self.reader.readexactly(size) if size else b"")
        self.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_eof(self, timeout: float = 5.0) -> None:
        """Until the client closed the connection (whatever it still sent is dropped)."""
        async with asyncio.timeout(timeout):
            while await self.reader.read(65536):
                pass
        self.saw_eof.set()


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """A server on a free port whose ``handler`` runs once per accepted connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def accepted(self) -> int:
        return len(self.peers)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        try:
            await self.handler(peer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away: part of several scenarios
        except Exception as exc:  # reported by __aexit__
            self.errors.append(exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for peer in self.peers:
            peer.writer.close()  # handlers reading get EOF
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=1.0)
        for task in pending:  # waiting on an event the test never set
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        await self._server.wait_closed()
        if exc_info[0] is None and self.errors:
            raise self.errors[0]


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, idle_timeout: float = 4.0, stream_settle: float = 0.25
) -> AsyncIterator[tuple[RawServer, UpstreamPool]]:
    """A raw server and a pool; the pool is closed before the server."""
    async with RawServer(handler) as server:
        pool = UpstreamPool(idle_timeout=idle_timeout, stream_settle=stream_settle)
        try:
            yield server, pool
        finally:
            pool.close()


def answering(*responses: bytes) -> Handler:
    """A keep-alive server: reads a request, writes the next response (the last repeats)."""

    async def handler(peer: Peer) -> None:
        index = 0
        while True:
            await peer.read_request()
            await peer.send(responses[min(index, len(responses) - 1)])
            index += 1

    return handler


async def get(
    pool: UpstreamPool,
    port: int,
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    read_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    fresh: bool = False,
) -> Response:
    head = request_head(method, b"/x", f"{HOST}:{port}".encode(), headers or [], len(body))
    return await pool.request(
        HOST,
        port,
        head,
        body,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        head_only=method == "HEAD",
        fresh=fresh,
    )


async def read_all(response: Response) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


OK_HELLO = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Mixed-Case: Yes\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


# --- framing and keep-alive ------------------------------------------------------------------


async def test_content_length_body_then_reuse() -> None:
    second_half = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Mixed-Case: Yes\r\n"
            b"Content-Length: 5\r\n\r\nhel"
        )
        await second_half.wait()
        await peer.send(b"lo")
        await answering(OK_HELLO)(peer)  # then ordinary keep-alive answers

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert response.status == 200
        assert response.headers == [  # values as sent, names in lower case
            (b"content-type", b"text/plain"),
            (b"x-mixed-case", b"Yes"),
            (b"content-length", b"5"),
        ]
        assert response.header(b"x-mixed-case") == b"Yes"
        assert response.header(b"absent") is None
        assert await response.read() == b"hel"
        assert not response.at_eof()
        second_half.set()
        assert await response.read() == b"lo"
        assert response.at_eof()  # right after the read that completed the body
        assert await response.read() == b""
        conn = response._conn
        response.release()
        assert pool.open_connections == 1

        for _ in range(3):
            response = await get(pool, server.port)
            assert response._conn is conn
            assert await response.read() == b"hello"
            assert response.at_eof()
            response.release()
        assert server.accepted == 1
        assert len(server.peers[0].requests) == 4
        assert server.peers[0].requests[0] == (
            f"GET /x HTTP/1.1\r\nhost: {HOST}:{server.port}\r\n\r\n".encode()
        )
        assert pool.open_connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_empty_bodies_are_complete_and_kept_alive(answer: bytes) -> None:
    async with serving(answering(answer)) as (server, pool):
        for _ in range(2):
            response = await get(pool, server.port)
            assert response.at_eof()
            assert await response.read() == b""
            response.release()
        assert server.accepted == 1


async def test_chunked_body_arrives_chunk_by_chunk() -> None:
    steps = [asyncio.Event(), asyncio.Event()]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await steps[0].wait()  # only once the client has read the first chunk
        await peer.send(b"6\r\nsecond\r\n")
        await steps[1].wait()
        await peer.send(b"0\r\n\r\n")
        await answering(OK_HELLO)(peer)

    # No settle time: reuse right after a chunked answer is what is tested here.
    async with serving(handler, stream_settle=0) as (server, pool):
        response = await get(pool, server.port)
        assert await response.read() == b"first"
        assert not response.at_eof()
        steps[0].set()
        assert await response.read() == b"second"
        assert not response.at_eof()
        steps[1].set()
        assert await response.read() == b""
        assert response.at_eof()
        response.release()
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        response.release()
        assert server.accepted == 1


async def test_chunked_body_with_trailers_and_many_chunks_in_one_write() -> None:
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in [b"a", b"bc", b"def"])
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    answer += b"0\r\nX-Trailer: 1\r\n\r\n"
    async with serving(answering(answer), stream_settle=0) as (server, pool):
        for _ in range(2):
            response = await get(pool, server.port)
            assert await read_all(response) == b"abcdef"
            assert response.at_eof()
            response.release()
        assert server.accepted == 1


async def test_body_delimited_by_connection_close() -> None:
    more = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart1")
        await more.wait()
        await peer.send(b"part2")
        # the handler returns: the server closes the connection

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert response.status == 200
        assert await response.read() == b"part1"
        assert not response.at_eof()
        more.set()
        assert await read_all(response) == b"part2"
        assert response.at_eof()
        assert await response.read() == b""
        response.release()
        assert pool.open_connections == 0
        response = await get(pool, server.port)  # a new connection
        assert await read_all(response) == b"part1part2"  # (the event is set already)
        response.release()
        assert server.accepted == 2


async def test_a_connection_the_server_closed_is_freed_without_the_cyclic_collector() -> None:
    # llama.cpp closes its connection after every stream. A closed connection once stayed
    # in a reference cycle (its parser holds its callbacks, its transport holds it) until
    # the cyclic collector ran, 15 us per stream (docs/performance.md): with the collector
    # off, the last reference must free it.
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        # the handler returns: the server closes the connection

    gc.disable()
    try:
        async with serving(handler) as (server, pool):
            response = await get(pool, server.port)
            assert await read_all(response) == b"hello"
            conn = weakref.ref(response._conn)  # noqa: SLF001
            response.release()
            del response
            await wait_until(lambda: conn() is None)
            assert pool.open_connections == 0
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=["connection-close", "http-1.0"],
)
async def test_connection_close_answer_is_not_pooled(answer: bytes) -> None:
    # The server keeps the connection open: the client must close it on its own.
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(answer)
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await read_all(response) == b"ok"
        response.release()
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)
        response = await get(pool, server.port)
        assert await read_all(response) == b"ok"
        response.release()
        assert server.accepted == 2


async def test_idle_connection_older_than_idle_timeout_is_not_reused() -> None:
    async def handler(peer: Peer) -> None:
        await answering(OK_HELLO)(peer)

    async with serving(handler, idle_timeout=0.05) as (server, pool):
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        response.release()
        await asyncio.sleep(0.1)  # the passing time is the condition
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        response.release()
        assert server.accepted == 2
        assert pool.open_connections == 1
        # The stale one was closed, not leaked.
        await asyncio.wait_for(server.peers[0].reader.read(), 5)


# --- connections the server closes -------------------------------------------------------------


async def test_idle_connection_closed_by_server_is_replaced() -> None:
    close_now = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(OK_HELLO)
        if peer.index == 0:
            await close_now.wait()  # then the handler returns: the server closes it
            return
        await answering(OK_HELLO)(peer)

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        conn = response._conn
        response.release()
        assert pool.open_connections == 1
        close_now.set()
        await wait_until(lambda: pool.open_connections == 0)  # with no request to find out
        assert conn.state is ConnState.CLOSED
        assert pool.idle_connections(HOST, server.port) == 0
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        response.release()
        assert server.accepted == 2


async def test_reused_connection_closed_on_next_request_raises_dropped_reused() -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            await peer.send(OK_HELLO)
            await peer.read_request()
            return  # closes without answering: the engine's keep-alive race
        await answering(OK_HELLO)(peer)

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        response.release()
        with pytest.raises(Dropped) as caught:
            await get(pool, server.port)
        assert caught.value.reused is True
        assert pool.open_connections == 0
        response = await get(pool, server.port, fresh=True)
        assert await read_all(response) == b"hello"
        response.release()
        assert server.accepted == 2
        assert len(server.peers[0].requests) == 2


async def test_fresh_connection_closed_before_any_byte_raises_dropped_not_reused() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()  # then closes

    async with serving(handler) as (server, pool):
        with pytest.raises(Dropped) as caught:
            await get(pool, server.port)
        assert caught.value.reused is False
        assert pool.open_connections == 0
        # fresh=True behaves the same on a connection that is new anyway
        with pytest.raises(Dropped) as caught:
            await get(pool, server.port, fresh=True)
        assert caught.value.reused is False
        assert server.accepted == 2


@pytest.mark.parametrize(
    "head, sent",
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"0123456789"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"a\r\n0123456789\r\n"),
    ],
    ids=["content-length", "chunked"],
)
async def test_server_closes_mid_body(head: bytes, sent: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(head + sent)  # then closes

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await response.read() == b"0123456789"
        with pytest.raises(UpstreamError) as caught:
            await response.read()
        assert not isinstance(caught.value, Dropped | ReadTimeout)
        assert not response.at_eof()
        with pytest.raises(UpstreamError):  # it stays failed
            await response.read()
        response.release()
        assert pool.open_connections == 0


async def test_server_closes_inside_the_headers() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    async with serving(handler) as (server, pool):
        with pytest.raises(UpstreamError) as caught:
            await get(pool, server.port)
        assert not isinstance(caught.value, Dropped)  # bytes had come: not safe to retry
        assert pool.open_connections == 0


# --- timeouts --------------------------------------------------------------------------------


async def test_read_timeout_after_a_first_chunk() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await peer.wait_eof(timeout=10)

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port, read_timeout=0.3)
        assert await response.read() == b"one"
        began = time.monotonic()
        with pytest.raises(ReadTimeout):
            await response.read()
        assert 0.2 <= time.monotonic() - began <= 1.5
        response.release()
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


async def test_read_timeout_when_the_server_answers_nothing() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.wait_eof(timeout=10)

    async with serving(handler) as (server, pool):
        began = time.monotonic()
        with pytest.raises(ReadTimeout):
            await get(pool, server.port, read_timeout=0.3)
        assert 0.25 <= time.monotonic() - began <= 1.5
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


async def test_slow_stream_does_not_time_out() -> None:
    """A chunk every 0.1 s for 1 s with read_timeout 0.3: the timer counts from the last
    data, not from the request."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for index in range(10):
            await asyncio.sleep(0.1)  # the model's pace
            await peer.send(b"1\r\n%d\r\n" % index)
        await peer.send(b"0\r\n\r\n")
        await answering(OK_HELLO)(peer)

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port, read_timeout=0.3)
        assert await read_all(response) == b"0123456789"
        response.release()
        assert pool.open_connections == 1


# --- connecting ------------------------------------------------------------------------------


async def test_connect_refused() -> None:
    # A bound socket that does not listen: the port is taken, and connecting is refused.
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        pool = UpstreamPool()
        try:
            with pytest.raises(ConnectFailed):
                await get(pool, port)
        finally:
            pool.close()
        assert pool.open_connections == 0


@contextlib.asynccontextmanager
async def hanging_address() -> AsyncIterator[tuple[str, int]]:
    """An address where connecting hangs: Linux drops a SYN while the listen queue is full."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers: list[socket.socket] = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                fillers.append(filler)
                try:
                    await asyncio.wait_for(loop.sock_connect(filler, address), 0.2)
                except TimeoutError:
                    break  # the queue is full
            else:
                pytest.skip("the listen queue never filled up")
            yield address
        finally:
            for filler in fillers:
                filler.close()


async def test_connect_timeout() -> None:
    async with hanging_address() as address:
        pool = UpstreamPool()
        try:
            began = time.monotonic()
            with pytest.raises(ConnectTimeout):
                await get(pool, address[1], connect_timeout=0.3)
            assert time.monotonic() - began < 1.5
            assert pool.open_connections == 0
            current = asyncio.current_task()
            assert current is not None and current.cancelling() == 0  # nothing left pending
        finally:
            pool.close()


async def test_a_connect_cancelled_from_outside_is_cancelled_not_timed_out() -> None:
    # The client left while its connection was being made (direct.py cancels the connect):
    # a cancellation, whatever the connect timeout's timer would have said later.
    async with hanging_address() as address:
        pool = UpstreamPool()
        try:
            task = asyncio.create_task(get(pool, address[1], connect_timeout=0.5))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.6)  # past the timeout: its timer was stopped
            assert pool.open_connections == 0
        finally:
            pool.close()


# --- backpressure ----------------------------------------------------------------------------


async def test_backpressure_pauses_reading_and_keeps_every_byte() -> None:
    payload = os.urandom(4 * 1024 * 1024)
    drained = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        drained.set()
        await answering(OK_HELLO)(peer)

    async with serving(handler) as (server, pool):
        # read_timeout shorter than the pause: a client that does not read is no
        # model that is late.
        response = await get(pool, server.port, read_timeout=0.3)
        conn = response._conn
        await wait_until(lambda: conn._paused)
        buffered = conn._buffered
        assert upstream._PAUSE_AT < buffered <= upstream._PAUSE_AT + 1024 * 1024
        await asyncio.sleep(0.7)  # proving that nothing more is read meanwhile
        assert conn._paused
        assert conn._buffered == buffered
        assert not conn.closed and conn.error is None  # no read timeout while paused
        data = await read_all(response)
        assert len(data) == len(payload)
        assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
        assert response.at_eof()
        await asyncio.wait_for(drained.wait(), 5)
        response.release()
        assert pool.open_connections == 1
        response = await get(pool, server.port)  # the same connection, resumed
        assert await read_all(response) == b"hello"
        response.release()
        assert server.accepted == 1


async def test_read_timeout_counts_from_the_resume_after_a_pause() -> None:
    read_timeout = 0.4
    pause_at = upstream._PAUSE_AT
    resumed = asyncio.Event()
    first_part = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (pause_at + 11))
        await peer.send(b"a" * pause_at)  # not yet over the limit
        await first_part.wait()
        await peer.send(b"b")  # over it: reading pauses with nothing left in the kernel
        await resumed.wait()
        await asyncio.sleep(read_timeout * 0.6)  # well within read_timeout of the resume
        await peer.send(b"c" * 10)
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port, read_timeout=read_timeout)
        conn = response._conn
        await wait_until(lambda: conn._buffered == pause_at)
        first_part.set()
        await wait_until(lambda: conn._paused)
        await asyncio.sleep(read_timeout * 2.5)  # a slow client; the timer re-arms meanwhile
        assert conn._timer is not None
        loop = asyncio.get_running_loop()
        # Resume just before the timer's next check.
        await asyncio.sleep(max(0.0, conn._timer.when() - loop.time() - 0.1))
        data = await response.read()  # takes everything: reading resumes
        resumed.set()
        assert len(data) == pause_at + 1
        assert await response.read() == b"c" * 10
        response.release()


# --- HEAD, invalid answers ---------------------------------------------------------------------


async def test_head_answer_has_no_body_and_is_not_reused() -> None:
    async def handler(peer: Peer) -> None:
        request = await peer.read_request()
        assert request.startswith(b"HEAD /x HTTP/1.1\r\n")
        assert b"content-length" not in request
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port, method="HEAD")
        assert response.status == 200
        assert response.header(b"content-length") == b"5"
        assert response.at_eof()
        assert await asyncio.wait_for(response.read(), 1) == b""
        response.release()
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)
        response = await get(pool, server.port, method="HEAD")
        response.release()
        assert server.accepted == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
)
async def test_invalid_http_raises_upstream_error(answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(answer)
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        with pytest.raises(UpstreamError, match="invalid HTTP") as caught:
            await get(pool, server.port)
        assert not isinstance(caught.value, Dropped)
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


async def test_invalid_chunk_mid_body_raises_upstream_error() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await peer.send(b"zz\r\n")
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await response.read() == b"ok"
        with pytest.raises(UpstreamError, match="invalid HTTP"):
            await response.read()
        response.release()
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


async def test_unasked_protocol_switch_is_invalid_http() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
        )
        await peer.wait_eof()

    loop = asyncio.get_running_loop()
    logged: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: logged.append(context))
    try:
        async with serving(handler) as (server, pool):
            # Raised by request() or by the first read(): not relayed as an answer.
            with pytest.raises(UpstreamError, match="invalid HTTP"):
                response = await get(pool, server.port)
                try:
                    await read_all(response)
                finally:
                    response.release()
    finally:
        loop.set_exception_handler(None)
    assert logged == []


async def test_interim_answer_is_skipped() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await asyncio.sleep(0.1)  # the final answer in a later packet
        await peer.send(OK_HELLO)
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert response.status == 200
        assert response.header(b"content-length") == b"5"
        assert await read_all(response) == b"hello"
        response.release()


# --- cancellation, closing the pool -------------------------------------------------------------


async def test_cancelled_read_then_release_closes_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await response.read() == b"one"
        conn = response._conn
        reading = asyncio.create_task(response.read())
        await wait_until(lambda: conn._waiter is not None)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        # Nothing left to wake: the read's future went with it (cancelled).
        assert conn._waiter is None or conn._waiter.cancelled()
        response.release()
        assert conn.closed
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


async def test_cancelled_request_closes_the_connection() -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.wait_eof()  # answers nothing

    async with serving(handler) as (server, pool):
        requesting = asyncio.create_task(get(pool, server.port))
        await wait_until(lambda: server.accepted == 1 and bool(server.peers[0].requests))
        requesting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await requesting
        assert pool.open_connections == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


async def test_pool_close_closes_idle_connections() -> None:
    both_asked = asyncio.Event()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if server.accepted == 2:
            both_asked.set()
        await both_asked.wait()  # two connections at once
        await peer.send(OK_HELLO)
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        responses = await asyncio.gather(get(pool, server.port), get(pool, server.port))
        for response in responses:
            assert await read_all(response) == b"hello"
            response.release()
        assert server.accepted == 2
        assert pool.open_connections == 2
        pool.close()
        assert pool.open_connections == 0
        for peer in server.peers:
            await asyncio.wait_for(peer.saw_eof.wait(), 5)
        # A closed pool opens new connections when asked again.
        response = await get(pool, server.port)
        assert await read_all(response) == b"hello"
        response.release()
        assert server.accepted == 3


# --- the exchange's states: stray bytes, retries, keep-alive limits, settling --------------------


def echo(request: bytes) -> bytes:
    """An answer whose body is the request's body: each request can tell its own answer."""
    body = request.partition(b"\r\n\r\n")[2]
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def echoing(peer: Peer) -> None:
    while True:
        await peer.send(echo(await peer.read_request()))


async def post(pool: UpstreamPool, port: int, body: bytes) -> bytes:
    response = await get(pool, port, method="POST", body=body)
    try:
        return await read_all(response)
    finally:
        response.release()


def posted(port: int, body: bytes) -> bytes:
    """The exact bytes a server reads for ``post(pool, port, body)``."""
    return request_head("POST", b"/x", f"{HOST}:{port}".encode(), [], len(body)) + body


LATE = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"


async def test_bytes_on_an_idle_connection_make_it_dirty() -> None:
    released = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 0:
            return await echoing(peer)
        await peer.send(echo(await peer.read_request()))
        await released.wait()
        await peer.send(LATE)  # a late (or duplicate) answer nobody asked for
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port, method="POST", body=b"one")
        assert await read_all(response) == b"one"
        conn = response._conn
        response.release()
        assert conn.state is ConnState.IDLE and pool.idle_connections(HOST, server.port) == 1
        released.set()
        await wait_until(lambda: conn.closed)  # when the bytes come, not at the next request
        assert conn.state is ConnState.DIRTY
        assert pool.open_connections == 0 and pool.idle_connections(HOST, server.port) == 0
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)
        assert await post(pool, server.port, b"two") == b"two"  # its own answer
        assert server.accepted == 2
        assert server.peers[0].requests == [posted(server.port, b"one")]
        assert server.peers[1].requests == [posted(server.port, b"two")]


@pytest.mark.parametrize("when", ["same-write", "before-release", "after-connection-close"])
async def test_a_second_answer_is_never_read_as_the_next_one(when: str) -> None:
    now = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index > 0:
            return await echoing(peer)
        first = echo(await peer.read_request())
        if when == "same-write":
            await peer.send(first + LATE)
        elif when == "before-release":
            await peer.send(first)
            await now.wait()
            await peer.send(LATE)
        else:
            close = first.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
            await peer.send(close + LATE)
        await peer.wait_eof()

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port, method="POST", body=b"one")
        conn = response._conn
        assert await read_all(response) == b"one"  # exactly the first answer
        assert response.at_eof() and conn.error is None
        if when == "before-release":
            assert conn.state is ConnState.DONE
            now.set()
            await wait_until(lambda: conn.closed)
            assert await response.read() == b""  # the answer stays whole, no error
        assert conn.state is ConnState.DIRTY
        response.release()
        assert pool.open_connections == 0
        assert await post(pool, server.port, b"two") == b"two"
        assert server.accepted == 2
        assert server.peers[0].requests == [posted(server.port, b"one")]
        await asyncio.wait_for(server.peers[0].saw_eof.wait(), 5)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_reused_connection_ended_after_the_request_was_read(how: str) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index > 0:
            return await echoing(peer)
        await peer.send(echo(await peer.read_request()))
        await peer.read_request()  # read whole: the engine may have started on it
        if how == "reset":
            peer.writer.transport.abort()

    async with serving(handler) as (server, pool):
        assert await post(pool, server.port, b"one") == b"one"
        with pytest.raises(Dropped) as caught:
            await get(pool, server.port, method="POST", body=b"two")
        dropped = caught.value
        assert dropped.reused and dropped.sent
        assert not dropped.may_retry("POST", [])  # the relay answers 502
        assert dropped.may_retry("GET", [])
        assert dropped.may_retry("POST", [(b"Idempotency-Key", b"k")])
        assert pool.open_connections == 0
        assert server.peers[0].requests == [
            posted(server.port, b"one"),
            posted(server.port, b"two"),
        ]


def test_retry_rule() -> None:
    written = Dropped("closed", reused=True)
    for method in ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"):
        assert written.may_retry(method, [])
    for method in ("POST", "PATCH", "CONNECT", "get"):
        assert not written.may_retry(method, [(b"x-other", b"1")])
    assert written.may_retry("POST", [(b"Idempotency-Key", b"1")])
    assert written.may_retry("POST", [(b"x-idempotency-key", b"")])
    assert idempotent("PUT", []) and not idempotent("POST", [])
    # A fresh connection that closed on a request: the server is failing, not racing.
    assert not Dropped("closed", reused=False).may_retry("GET", [])
    # Certainly not sent: whatever the method, whatever the connection.
    assert Dropped("reset", reused=False, sent=False).may_retry("POST", [])
    assert Dropped("reset", reused=True, sent=False).may_retry("POST", [])


class Listener:
    """A listening socket driven by hand: what the test writes on an accepted socket lies in
    the client's socket before the event loop runs again."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []

    async def accept(self) -> socket.socket:
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(self.sock), 5)
        self.accepted.append(conn)
        return conn

    async def exchange(self, pool: UpstreamPool, body: bytes) -> socket.socket:
        """A request on a new connection, answered; the server's socket stays open."""
        loop = asyncio.get_running_loop()
        requesting = asyncio.create_task(post(pool, self.port, body))
        conn = await self.accept()
        expected = posted(self.port, body)
        data = b""
        while len(data) < len(expected):
            data += await asyncio.wait_for(loop.sock_recv(conn, 65536), 5)
        assert data == expected
        conn.send(echo(data))
        assert await requesting == body
        return conn

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def arrived(conn: Any) -> None:
    """Blocks (the event loop does not run) until the connection's socket is readable."""
    readable, _, _ = select.select([conn._fd], [], [], 5)
    assert readable


@pytest.mark.parametrize("how", ["bytes", "end", "reset"])
async def test_pooled_connection_is_looked_at_before_it_is_written_to(how: str) -> None:
    """The server's bytes, end or reset reached the socket but not yet the event loop: the
    look before writing finds them, and the request goes on a new connection, once."""
    server = Listener()
    pool = UpstreamPool()
    try:
        first = await server.exchange(pool, b"one")
        conn = pool._idle[HOST, server.port][-1]
        if how == "bytes":
            first.send(LATE)
        elif how == "end":
            first.shutdown(socket.SHUT_WR)
        else:
            first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            first.close()
        arrived(conn)
        assert conn.state is ConnState.IDLE  # the loop has not seen it
        assert pool._reuse((HOST, server.port)) is None
        assert conn.state is (ConnState.DIRTY if how == "bytes" else ConnState.CLOSED)
        assert pool.open_connections == 0
        await server.exchange(pool, b"two")  # on a new connection
        assert len(server.accepted) == 2
        if how != "reset":  # nothing more was written to the first one
            try:
                assert first.recv(65536) == b""
            except ConnectionResetError:
                assert how == "bytes"  # closed with the stray bytes unread: a reset
    finally:
        pool.close()
        server.close()


async def test_a_write_that_fails_at_once_did_not_send_the_request() -> None:
    """The transport (asyncio's, uvloop's) tries a write at once and fails it there: no
    byte of the request left, so it may be sent again, whatever its method."""
    server = Listener()
    pool = UpstreamPool()
    try:
        first = await server.exchange(pool, b"one")
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()
        conn = pool._idle[HOST, server.port].pop()  # taken without the look at the socket
        arrived(conn)
        with pytest.raises(Dropped) as caught:
            conn.send(posted(server.port, b"two"), b"", False, 5.0)
        assert caught.value.sent is False and caught.value.reused is True
        assert caught.value.may_retry("POST", [])
        assert conn.state is ConnState.CLOSED
        assert pool.open_connections == 0
    finally:
        pool.close()
        server.close()


async def test_keep_alive_timeout_and_max_are_honoured() -> None:
    answer = b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1, max=2\r\nContent-Length: 2\r\n\r\nok"
    async with serving(answering(answer)) as (server, pool):
        for _ in range(5):
            response = await get(pool, server.port)
            assert await read_all(response) == b"ok"
            response.release()
        assert [len(peer.requests) for peer in server.peers] == [2, 2, 1]
        assert pool.open_connections == 1
        await asyncio.sleep(0.8)  # past 1 s less its margin (1/4): the passing time counts
        response = await get(pool, server.port)
        assert await read_all(response) == b"ok"
        response.release()
        assert [len(peer.requests) for peer in server.peers] == [2, 2, 1, 1]
        assert pool.open_connections == 1


@pytest.mark.parametrize("keep_alive", [b"timeout=0", b"max=1", b"timeout=5, max=1"])
async def test_keep_alive_that_allows_no_second_request(keep_alive: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\nKeep-Alive: %s\r\nContent-Length: 2\r\n\r\nok" % keep_alive
    async with serving(answering(answer)) as (server, pool):
        for _ in range(2):
            response = await get(pool, server.port)
            assert await read_all(response) == b"ok"
            conn = response._conn
            response.release()
            assert conn.state is ConnState.CLOSED and pool.open_connections == 0
        assert server.accepted == 2


WHOLE_CHUNKS = [
    (b"5\r\nhello\r\n", [b"hello"]),
    (b"5\r\nhello\r\n3\r\nabc\r\n", [b"hello", b"abc"]),
    (b"00005\r\nhello\r\n", [b"hello"]),
    (b"A\r\n0123456789\r\n", [b"0123456789"]),
    (b"4\r\n\r\n\r\n\r\n", [b"\r\n\r\n"]),
]
NOT_WHOLE_CHUNKS = [
    b"",
    b"0\r\n\r\n",  # the last chunk: the parser ends the answer
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;x=1\r\nhello\r\n",  # an extension
    b" 5\r\nhello\r\n",
    b"5 \r\nhello\r\n",
    b"+5\r\nhello\r\n",
    b"0x5\r\nhello\r\n",
    b"1_0\r\n0123456789abcdef\r\n",
    b"5\r\nhell",  # cut by the read
    b"5\r\nhello\r",
    b"5\r\nhelloXY",
    b"5\r\nhello\r\n3\r\nab",
    b"\r\nhello\r\n",  # no size
    b"5\nhello\r\n",  # a bare LF
    b"1" * 17 + b"\r\n",  # a size line longer than 16 digits
]


@pytest.mark.parametrize(("data", "payloads"), WHOLE_CHUNKS)
def test_whole_chunks_are_what_the_parser_reads_between_two_chunks(
    data: bytes, payloads: list[bytes]
) -> None:
    # What passes without the parser (upstream._whole_chunks) is what llhttp reads from
    # the same bytes, and leaves it between two chunks: the last chunk then ends the answer.
    assert upstream._whole_chunks(data) == payloads

    class Reader:
        def __init__(self) -> None:
            self.bodies: list[bytes] = []
            self.complete = False

        def on_body(self, body: bytes) -> None:
            self.bodies.append(body)

        def on_message_complete(self) -> None:
            self.complete = True

    reader = Reader()
    parser = httptools.HttpResponseParser(reader)
    parser.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    parser.feed_data(data)
    assert b"".join(reader.bodies) == b"".join(payloads) and not reader.complete
    parser.feed_data(b"0\r\n\r\n")
    assert reader.complete


@pytest.mark.parametrize("data", NOT_WHOLE_CHUNKS)
def test_anything_but_whole_chunks_is_left_to_the_parser(data: bytes) -> None:
    assert upstream._whole_chunks(data) is None


def test_keep_alive_params_and_chunked_coding() -> None:
    assert keep_alive_params(b"timeout=5, max=100") == (5.0, 100)
    assert keep_alive_params(b'Timeout="2"') == (2.0, None)
    assert keep_alive_params(b"max=x, timeout=-1, other") == (None, None)
    assert is_chunked(b"chunked") and is_chunked(b"gzip, Chunked ") and is_chunked(b"CHUNKED")
    for coding in (b"gzip-notchunked", b"chunked, gzip", b"notchunked", b"", b"chunkedx"):
        assert not is_chunked(coding)


@pytest.mark.parametrize(
    ("codings", "chunked"),
    [
        ([b"gzip-notchunked"], False),
        ([b"chunked, gzip"], False),
        ([b"gzip, chunked"], True),
        ([b" Chunked "], True),
        ([b"gzip", b"chunked"], True),  # two header lines: the last holds the final coding
    ],
)
async def test_only_a_final_chunked_coding_frames_the_body(
    codings: list[bytes], chunked: bool
) -> None:
    raw = b"3\r\nabc\r\n0\r\n\r\n"

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        head = b"".join(b"Transfer-Encoding: %s\r\n" % coding for coding in codings)
        await peer.send(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + raw)
        if chunked:
            await peer.wait_eof()
        # else the body ends with the connection: the handler returns and closes it

    async with serving(handler) as (server, pool):
        response = await get(pool, server.port)
        assert await read_all(response) == (b"abc" if chunked else raw)
        assert response.at_eof()
        response.release()
        assert pool.open_connections == (1 if chunked else 0)


CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


async def test_a_connection_settles_after_a_chunked_answer() -> None:
    """llama.cpp closes the connection a moment after each streamed answer, unannounced: a
    request written in that moment would be lost. None is written there."""

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(CHUNKED_OK)
        await asyncio.sleep(0.05)  # then the handler returns: the server closes it

    async with serving(handler, stream_settle=0.25) as (server, pool):
        for _ in range(3):
            response = await get(pool, server.port)  # at once after the previous answer
            assert await read_all(response) == b"ok"
            response.release()
        assert server.accepted == 3
        assert [len(peer.requests) for peer in server.peers] == [1, 1, 1]
        await wait_until(lambda: pool.open_connections == 0)  # each closed while idle
        assert not pool.keeps_streams(HOST, server.port)


async def test_a_server_that_keeps_connections_after_chunked_answers_is_trusted() -> None:
    close_after = asyncio.Event()

    async def handler(peer: Peer) -> None:
        while True:
            await peer.read_request()
            await peer.send(CHUNKED_OK)
            if close_after.is_set():
                return  # closes right after this answer: trust is lost

    async def ok() -> Any:
        response = await get(pool, server.port)
        assert await read_all(response) == b"ok"
        response.release()
        return response._conn

    async with serving(handler, stream_settle=0.1) as (server, pool):
        first = await ok()
        second = await ok()  # the first is settling: a new connection
        assert first is not second and server.accepted == 2
        assert not pool.keeps_streams(HOST, server.port)
        await asyncio.sleep(0.15)  # both settled: the passing time is the condition
        assert await ok() is second  # still open after settling: the server keeps them
        assert pool.keeps_streams(HOST, server.port)
        assert await ok() is second  # now reused at once
        close_after.set()
        assert await ok() is second
        await wait_until(lambda: second.closed)
        assert not pool.keeps_streams(HOST, server.port)
        assert server.accepted == 2


def test_transitions_are_enforced() -> None:
    loop = asyncio.new_event_loop()
    try:
        conn = upstream._Connection((HOST, 1), lambda _: None, loop)
        assert conn.state is ConnState.IDLE
        with pytest.raises(StateError):
            conn._to(ConnState.DONE)  # IDLE -> DONE: no answer without a request
        with pytest.raises(StateError):
            conn.make_idle(4.0)  # released twice
        conn.close("test")
        assert conn.state is ConnState.CLOSED and conn.reason == "test"
        conn.close("again")  # final: later ends change nothing
        assert conn.reason == "test"
        with pytest.raises(StateError):
            conn._to(ConnState.IDLE)
        with pytest.raises(StateError):
            conn.send(b"GET / HTTP/1.1\r\n\r\n", b"", False, 1.0)
    finally:
        loop.close()


async def test_each_exchange_has_its_own_parser_and_release_is_once() -> None:
    async with serving(echoing) as (server, pool):
        response = await get(pool, server.port, method="POST", body=b"a")
        parser = response._conn._parser
        assert await read_all(response) == b"a"
        response.release()
        response.release()  # a second release does nothing
        assert pool.idle_connections(HOST, server.port) == 1
        response = await get(pool, server.port, method="POST", body=b"b")
        assert response._conn._parser is not parser
        assert await read_all(response) == b"b"
        response.release()
        assert server.accepted == 1


# --- request_head, and an ordinary server --------------------------------------------------------


def test_request_head_exact_bytes() -> None:
    headers = [(b"Content-Type", b"application/json"), (b"x-b", b"2"), (b"x-a", b"1")]
    assert request_head("POST", b"/v1/chat?a=1", b"127.0.0.1:8080", headers, 17) == (
        b"POST /v1/chat?a=1 HTTP/1.1\r\n"
        b"host: 127.0.0.1:8080\r\n"
        b"Content-Type: application/json\r\n"
        b"x-b: 2\r\n"
        b"x-a: 1\r\n"
        b"content-length: 17\r\n"
        b"\r\n"
    )
    assert request_head("GET", b"/v1/models", b"h:1", [(b"accept", b"*/*")], 0) == (
        b"GET /v1/models HTTP/1.1\r\nhost: h:1\r\naccept: */*\r\n\r\n"
    )
    # A body-carrying method says its empty body is empty; the others say nothing.
    assert request_head("POST", b"/", b"h", [], 0) == (
        b"POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n"
    )
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        assert b"content-length" not in request_head(method, b"/", b"h", [], 0)
    assert request_head("DELETE", b"/", b"h", [], 3).endswith(b"content-length: 3\r\n\r\n")


async def test_against_aiohttp_server_large_post_and_stream() -> None:
    peers: set[Any] = set()

    async def echo(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        body = await request.read()
        response = web.StreamResponse(headers={"X-Length": str(len(body))})
        await response.prepare(request)
        for offset in range(0, len(body), 50_000):  # chunked, in several writes
            await response.write(body[offset : offset + 50_000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/x", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, HOST, 0)
        await site.start()
        port = runner.addresses[0][1]
        pool = UpstreamPool(stream_settle=0.1)
        try:
            # Its answers are chunked: the first connection is reused only once settled, and
            # then the server is known to keep connections after chunked answers.
            response = await get(pool, port)
            assert await read_all(response) == b""
            response.release()
            assert not pool.keeps_streams(HOST, port)
            await asyncio.sleep(0.15)  # the passing time is the condition
            for size in (0, 10, 70_000, 300_000):  # 70_000: the body goes in its own write
                body = os.urandom(size)
                response = await get(
                    pool,
                    port,
                    method="POST",
                    body=body,
                    headers=[(b"content-type", b"application/octet-stream")],
                )
                assert response.status == 200
                assert response.header(b"x-length") == str(size).encode()
                assert await read_all(response) == body
                response.release()
            assert pool.keeps_streams(HOST, port)
            assert len(peers) == 1  # one keep-alive connection throughout
        finally:
            pool.close()
    finally:
        await runner.cleanup()


# --- the same scenarios on uvloop ------------------------------------------------------------------


async def case_second_answer_in_the_same_write() -> None:
    await test_a_second_answer_is_never_read_as_the_next_one("same-write")


async def case_reused_connection_reset_after_the_request_was_read() -> None:
    await test_reused_connection_ended_after_the_request_was_read("reset")


async def case_pending_bytes_found_before_writing() -> None:
    await test_pooled_connection_is_looked_at_before_it_is_written_to("bytes")


async def case_pending_end_found_before_writing() -> None:
    await test_pooled_connection_is_looked_at_before_it_is_written_to("end")


async def case_pending_reset_found_before_writing() -> None:
    await test_pooled_connection_is_looked_at_before_it_is_written_to("reset")


async def case_gzip_notchunked_ends_with_the_connection() -> None:
    await test_only_a_final_chunked_coding_frames_the_body([b"gzip-notchunked"], False)


UVLOOP_SCENARIOS: list[Callable[[], Awaitable[None]]] = [
    test_bytes_on_an_idle_connection_make_it_dirty,
    case_second_answer_in_the_same_write,
    case_reused_connection_reset_after_the_request_was_read,
    case_pending_bytes_found_before_writing,
    case_pending_end_found_before_writing,
    case_pending_reset_found_before_writing,
    case_gzip_notchunked_ends_with_the_connection,
    test_a_write_that_fails_at_once_did_not_send_the_request,
    test_keep_alive_timeout_and_max_are_honoured,
    test_a_connection_settles_after_a_chunked_answer,
    test_each_exchange_has_its_own_parser_and_release_is_once,
    test_content_length_body_then_reuse,
    test_chunked_body_arrives_chunk_by_chunk,
    test_body_delimited_by_connection_close,
    test_a_connection_the_server_closed_is_freed_without_the_cyclic_collector,
    test_idle_connection_closed_by_server_is_replaced,
    test_reused_connection_closed_on_next_request_raises_dropped_reused,
    test_fresh_connection_closed_before_any_byte_raises_dropped_not_reused,
    test_read_timeout_after_a_first_chunk,
    test_read_timeout_when_the_server_answers_nothing,
    test_connect_refused,
    test_connect_timeout,
    test_a_connect_cancelled_from_outside_is_cancelled_not_timed_out,
    test_backpressure_pauses_reading_and_keeps_every_byte,
    test_head_answer_has_no_body_and_is_not_reused,
    test_invalid_chunk_mid_body_raises_upstream_error,
    test_cancelled_read_then_release_closes_the_connection,
    test_pool_close_closes_idle_connections,
    test_against_aiohttp_server_large_post_and_stream,
]


@pytest.mark.parametrize("scenario", UVLOOP_SCENARIOS, ids=lambda f: f.__name__[5:])
def test_on_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    async def run() -> None:
        await scenario()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
