"""The relay's HTTP/1.1 client to model servers: asyncio protocols with the httptools parser.

Why not aiohttp's client here: measured on the project's 2-core machine, its request and
response objects, timers and payload machinery cost about 0.21 ms of CPU per relayed
request, two thirds of the whole relay; this client costs about 0.02 ms for the same
exchange (benchmarks/, docs/performance.md). It does only what the relay needs: one
request at a time per connection, keep-alive reuse per model server, bodies framed by
Content-Length, chunked encoding or the connection's end, a read timeout, and backpressure
(reading pauses while a slow client has not taken what was read). Everything else the
manager sends (health probes, the CLI) keeps using aiohttp.

Concurrency rule: everything runs on the event loop thread; a connection belongs to one
response at a time, or to the pool while idle.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import cast

import httptools

_PAUSE_AT = 256 * 1024  # buffered body bytes that pause reading from the model server
_IDLE_PER_SERVER = 64  # idle keep-alive connections kept per model server


class UpstreamError(Exception):
    """The model server could not be reached or broke off."""


class ConnectFailed(UpstreamError):
    pass


class ConnectTimeout(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class Dropped(UpstreamError):
    """A connection closed before any byte of the answer: safe to retry on a new one when
    the connection was a reused keep-alive one (the engine closed it while idle)."""

    def __init__(self, message: str, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused


class _Connection(asyncio.Protocol):
    """One TCP connection and the response being read on it."""

    def __init__(
        self,
        key: tuple[str, int],
        lost: Callable[[_Connection], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.key = key
        self._lost = lost  # tells the pool, which must not hand out a closed connection
        # Kept: asyncio.get_running_loop() costs a getpid() system call per call.
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._last_data = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.headers_done = False
        self.eof = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.received = False
        self._interim = False  # inside a 1xx answer, which precedes the real one
        self._framed = False  # Content-Length or chunked: the end is not the connection's end
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not registered as an asyncio.Transport subclass.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # HttpParserUpgrade: a 101 nobody asked for (the relay never forwards Upgrade).
            self._fail(UpstreamError(f"invalid HTTP from the model server: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        self._lost(self)
        if self.eof:
            return
        if self.headers_done and not self._framed and exc is None:
            self.eof = True  # a body delimited by the end of the connection
            self._wake()
        elif not self.received:
            self._fail(Dropped("the model server closed the connection", self.reused))
        else:
            self._fail(UpstreamError("the model server closed the connection mid-response"))

    # --- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # chunked trailers are not the answer's headers
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:
            # 100 Continue, 103 Early Hints: HTTP clients skip interim answers.
            self._interim = True
            self.headers = []
            return
        self.keep_alive = self._parser.should_keep_alive()
        for name, value in self.headers:  # the one pass that looks at header names
            lowered = name.lower()
            if lowered == b"content-type":
                self.content_type = self.content_type or value
            elif lowered == b"content-length" or (
                lowered == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                self._framed = True
        self.headers_done = True
        if self._head_only:
            # A HEAD answer has no body whatever its Content-Length says; the parser cannot
            # be told so, so the connection is not reused.
            self.eof = True
            self.keep_alive = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.eof = True
        self._stop_timer()
        self._wake()

    # --- used by Response --------------------------------------------------------------------

    def send(self, head: bytes, body: bytes, head_only: bool, read_timeout: float) -> None:
        assert self.transport is not None
        self._reset()
        self._head_only = head_only
        if len(body) < 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)  # no copy of a large body
        # One timer per read_timeout period, re-armed from the time of the last data, not
        # one per wait: a token stream waits once per token.
        self._read_timeout = read_timeout
        self._last_data = self._loop.time()
        self._timer = self._loop.call_later(read_timeout, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        if self.eof or self.closed or self.error is not None:
            return
        quiet = self._loop.time() - self._last_data
        if self._paused or quiet < self._read_timeout:
            # Paused: the client has not taken what was read, the model is not late.
            wait = self._read_timeout if self._paused else self._read_timeout - quiet
            self._timer = self._loop.call_later(wait, self._check_timeout)
            return
        self._fail(ReadTimeout(f"no data from the model server for {self._read_timeout:g} s"))
        self.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def wait(self) -> None:
        """Until something new arrived (headers, a chunk, the end) or an error."""
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self._last_data = self._loop.time()  # the pause was the client's, not the model's
            self.transport.resume_reading()
        return data

    @property
    def has_data(self) -> bool:
        return bool(self._chunks)

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Response:
    """An answer being read. ``read()`` gives what has arrived, b"" at the end; ``release()``
    must follow (the connection goes back to the pool only after a complete answer)."""

    __slots__ = ("_conn", "_pool", "content_type", "headers", "status")

    def __init__(self, conn: _Connection, pool: UpstreamPool) -> None:
        self._conn = conn
        self._pool = pool
        self.status = conn.status
        self.headers = conn.headers  # raw (name, value) pairs as the server sent them
        self.content_type = conn.content_type  # b"" when absent

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        conn = self._conn
        while True:
            if conn.has_data:
                return conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.eof:
                return b""
            await conn.wait()

    def at_eof(self) -> bool:
        return self._conn.eof and not self._conn.has_data

    def release(self) -> None:
        self._pool.give_back(self._conn)


class UpstreamPool:
    """Keep-alive connections to the model servers, by (host, port).

    An idle connection older than ``idle_timeout`` is not reused: engines close theirs
    (llama.cpp after 5 s), and one closed just as a request is written costs a retry.
    """

    def __init__(self, idle_timeout: float = 4.0) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._idle_timeout = idle_timeout
        self._open: set[_Connection] = set()

    async def request(
        self,
        host: str,
        port: int,
        head: bytes,
        body: bytes,
        *,
        connect_timeout: float,
        read_timeout: float,
        head_only: bool = False,
        fresh: bool = False,
    ) -> Response:
        """Send a request (``head``: its request line and headers, ending in a blank line)
        and wait for the answer's status and headers.

        Raises ConnectFailed, ConnectTimeout, ReadTimeout, Dropped or UpstreamError.
        """
        key = (host, port)
        conn = None if fresh else self._reuse(key)
        if conn is None:
            conn = await self._connect(key, connect_timeout)
        try:
            conn.send(head, body, head_only, read_timeout)
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            self._discard(conn)
            raise
        return Response(conn, self)

    def give_back(self, conn: _Connection) -> None:
        # No timer to stop: a complete answer stopped it, and a discarded connection's
        # close() does.
        if conn.closed or not conn.eof or not conn.keep_alive or conn.has_data:
            self._discard(conn)
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _IDLE_PER_SERVER:
            self._discard(conn)
            return
        conn.reused = True
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def _reuse(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        limit = time.monotonic() - self._idle_timeout
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.closed or conn.idle_since < limit:
                self._discard(conn)
                continue
            return conn
        return None

    async def _connect(self, key: tuple[str, int], timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key, self._discard, loop), *key
                )
        except TimeoutError:
            raise ConnectTimeout(f"cannot connect to {key[0]}:{key[1]}") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)


def request_head(
    method: str, target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]], size: int
) -> bytes:
    """The request line and headers. ``headers`` must not hold Host or Content-Length; the
    values come from a request the server already parsed, so they hold no line breaks."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if size or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        parts += (b"content-length: ", str(size).encode("ascii"), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
