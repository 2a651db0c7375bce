"""The relay's HTTP/1.1 client to model servers: asyncio protocols with the httptools parser.

Why not aiohttp's client here: measured on the project's 2-core machine, its request and
response objects, timers and payload machinery cost about 0.21 ms of CPU per relayed
request, two thirds of the whole relay; this client costs about 0.02 ms for the same
exchange (benchmarks/, docs/performance.md). It does only what the relay needs: one
request at a time per connection, keep-alive reuse per model server, bodies framed by
Content-Length, chunked encoding or the connection's end, a read timeout, and backpressure
(reading pauses while a slow client has not taken what was read). Everything else the
manager sends (health probes, the CLI) keeps using aiohttp.

Connection states (``ConnState``; ``_Connection._to`` refuses any other transition)::

    IDLE --send--> SENT --first answer byte--> READING --answer complete--> DONE
      ^                                                                       |
      +------------- released, reusable, nothing more read -------------------+
    any state --> DIRTY   the engine broke the exchange, or the relay gave it up half-way
    any state --> CLOSED  closed in order, by either side

- A byte from the engine while IDLE (nobody asked) or after the answer is complete (DONE:
  a late or second answer) makes the connection DIRTY. DIRTY and CLOSED are final: the
  transport is closed and the pool forgets the connection at once.
- Each exchange gets a new parser, so nothing of one answer can be read as part of the next.
  (llhttp skips bare CR/LF that end the same read as an answer; any other byte counts.)
- Every byte of an answer is read by the parser, with one exception: while the parser
  stands between two chunks of an event stream's body (``_between_chunks``), a read of
  whole chunks, none the last, none with an extension (``_whole_chunks``: less than llhttp
  accepts, never more) goes to the client's transport as it came, and leaves the parser
  between two chunks. The first read that is anything else goes to the parser, and so does
  the rest of that answer. The end of an answer is always the parser's.
- Only DONE goes back to IDLE, in ``UpstreamPool.give_back``, and only when the answer was
  read to its end, keeps the connection alive (no ``Connection: close``, not HTTP/1.0,
  not a HEAD answer), and the engine's ``Keep-Alive: max=M`` allows another request
  (M counted as the connection's total, the stricter of the header's two readings).
- The engine closing a pooled connection is learnt when it happens (``eof_received`` /
  ``connection_lost`` while IDLE), and checked once more just before a pooled connection is
  written to: a non-blocking peek at its socket finds an end, a reset or stray bytes that
  the event loop has not delivered yet. An idle connection is not reused after the pool's
  ``idle_timeout`` nor after the engine's ``Keep-Alive: timeout=N`` less a margin.
- Settling: llama.cpp closes the connection after every streamed (chunked) answer without
  saying so, and not at once: 0.03 ms to a few ms after the last chunk, depending on load.
  A request written in that window meets the close after it was written, and a POST must
  then fail. So a connection whose answer was chunked is reused only ``stream_settle``
  seconds (0.25) after that answer, unless its server has shown that it keeps such
  connections (one was still open when reused after settling); a server that closes one
  within the settle time loses that trust again.

Retry rule, as Go's net/http transport: a request is sent again (once, on a new
connection) only when it certainly did not reach the model server (its write failed at
once: no byte of it left the relay), or when it is idempotent and met a reused keep-alive
connection that the server closed or reset before any byte of the answer. Idempotent means
GET, HEAD, OPTIONS, TRACE, PUT or DELETE (RFC 9110 section 9.2.2), or any request carrying an
``Idempotency-Key`` or ``X-Idempotency-Key`` header. Any other request whose connection
ends after it was written and before the answer began, a POST to /v1/chat/completions
above all, is not sent again: the server may have read it and worked on it, and the
client gets 502. (Finding a pooled connection closed before writing to it is no retry:
another connection is used, and the request is written once.) ``Dropped.may_retry``
applies the rule; the caller sends again.

Concurrency rule: everything runs on the event loop thread; a connection belongs to one
response at a time, or to the pool while idle.
"""

from __future__ import annotations

import asyncio
import enum
import select
import socket
from collections import deque
from collections.abc import Callable, Iterable
from typing import cast

import httptools

_PAUSE_AT = 256 * 1024  # buffered body bytes that pause reading from the model server
_IDLE_PER_SERVER = 64  # idle keep-alive connections kept per model server
_KEEP_ALIVE_MARGIN = 1.0  # seconds before an engine's Keep-Alive timeout (at most 1/4 of it)
_STREAM_SETTLE = 0.25  # seconds before a connection that carried a chunked answer is reused
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_POLL_EVENTS = select.POLLIN | getattr(select, "POLLRDHUP", 0) if hasattr(select, "poll") else 0

_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_IDEMPOTENCY_KEYS = frozenset({b"idempotency-key", b"x-idempotency-key"})


class UpstreamError(Exception):
    """The model server could not be reached or broke off."""


class ConnectFailed(UpstreamError):
    pass


class ConnectTimeout(UpstreamError):
    pass


class ReadTimeout(UpstreamError):
    pass


class Dropped(UpstreamError):
    """The connection ended before any byte of the answer.

    ``sent``: whether the request may have reached the server (False only when it certainly
    did not). ``reused``: whether the connection had carried an earlier exchange.
    """

    def __init__(self, message: str, reused: bool, sent: bool = True) -> None:
        super().__init__(message)
        self.reused = reused
        self.sent = sent

    def may_retry(self, method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether the request may be sent again: the retry rule of the module docstring."""
        return not self.sent or (self.reused and idempotent(method, headers))


def idempotent(method: str, headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request may be sent twice: an idempotent method (RFC 9110 section 9.2.2), or an
    ``Idempotency-Key`` / ``X-Idempotency-Key`` header, as Go's transport counts them."""
    if method in _IDEMPOTENT_METHODS:
        return True
    return any(name.lower() in _IDEMPOTENCY_KEYS for name, _ in headers)


def is_chunked(transfer_encoding: bytes) -> bool:
    """Whether chunked is the final transfer coding of a Transfer-Encoding value."""
    return transfer_encoding.rpartition(b",")[2].strip().lower() == b"chunked"


def keep_alive_params(value: bytes) -> tuple[float | None, int | None]:
    """``timeout`` and ``max`` of a Keep-Alive header; None where absent or invalid."""
    known = _KEEP_ALIVE_SEEN.get(value)
    if known is not None:
        return known  # an engine sends the same value every time
    if len(_KEEP_ALIVE_SEEN) >= 64:
        _KEEP_ALIVE_SEEN.clear()
    known = _KEEP_ALIVE_SEEN[value] = _parse_keep_alive(value)
    return known


_KEEP_ALIVE_SEEN: dict[bytes, tuple[float | None, int | None]] = {}


def _parse_keep_alive(value: bytes) -> tuple[float | None, int | None]:
    timeout: float | None = None
    most: int | None = None
    for part in value.split(b","):
        name, _, raw = part.partition(b"=")
        name = name.strip().lower()
        raw = raw.strip().strip(b'"')
        if not raw.isdigit():
            continue
        if name == b"timeout":
            timeout = float(int(raw))
        elif name == b"max":
            most = int(raw)
    return timeout, most


class ConnState(enum.Enum):
    IDLE = "idle"  # open, no exchange: new, or in the pool
    SENT = "sent"  # a request was written; no byte of its answer yet
    READING = "reading"  # the answer is arriving (interim answers included)
    DONE = "done"  # the answer is complete; the connection waits to be released
    DIRTY = "dirty"  # final: the engine broke the exchange, or it was given up half-way
    CLOSED = "closed"  # final: closed in order, by either side

    __hash__ = object.__hash__  # members are singletons; Enum's own hash runs Python code


_IDLE, _SENT, _READING, _DONE = ConnState.IDLE, ConnState.SENT, ConnState.READING, ConnState.DONE
_DIRTY, _CLOSED = ConnState.DIRTY, ConnState.CLOSED
_FINAL = frozenset({_DIRTY, _CLOSED})
_NEXT: dict[ConnState, frozenset[ConnState]] = {
    _IDLE: frozenset({_SENT, _DIRTY, _CLOSED}),
    _SENT: frozenset({_READING, _DIRTY, _CLOSED}),
    _READING: frozenset({_DONE, _DIRTY, _CLOSED}),
    _DONE: frozenset({_IDLE, _DIRTY, _CLOSED}),
    _DIRTY: frozenset(),
    _CLOSED: frozenset(),
}


class Splice:
    """Where an answer's body goes as it is read, written on by the connection itself.

    A token stream's reads each carry one event, and each Python frame on that path costs
    several times its in-process figure when the event finds the caches cold (measured,
    docs/performance.md): so the connection frames and writes such a read to the client's
    transport in its own ``data_received``, with the scanner the only call, instead of
    telling a listener that takes, frames and writes it. Only a read that leaves the
    answer open and whole is spliced: the read that ends the answer, one that fails it and
    one that brings a large chunk (``_SPLICE_MAX``) still go to the listener, which owns
    the answer's end. The relay sets a splice once the answer's head is out and takes it
    away while the client is not reading; each exchange begins without one. A read of
    whole chunks between two chunks is written as the engine framed it, without the parser
    (see the module's docstring): a token event then costs the parse and a frame less.
    """

    __slots__ = ("chunked", "scan", "transport")

    def __init__(
        self, transport: asyncio.Transport, chunked: bool, scan: Callable[[bytes], None]
    ) -> None:
        self.transport = transport
        self.chunked = chunked  # each read is sent as one chunk of the client's answer
        self.scan = scan  # sees every byte of the body, in order


_SPLICE_MAX = 64 * 1024  # a read this large goes to the listener (written apart, not copied)


_HEX_DIGITS = b"0123456789abcdefABCDEF"
_SIZE_LINE_MAX = 18  # a chunk's size line passed without the parser: 16 hex digits, CRLF


def _whole_chunks(data: bytes) -> list[bytes] | None:
    """The payloads of ``data`` when it is one or more whole chunks of a chunked body, none
    of them the last one (size 0) and none with an extension; else None.

    Such a read, fed to llhttp between two chunks, gives exactly these bodies and leaves it
    between two chunks again, so it may pass without the parser. Anything else (a size line
    of other characters, an extension, a chunk cut by the read, the last chunk and its
    trailers, a read too large) is left to the parser: this accepts less than llhttp does,
    never more.
    """
    payloads = []
    at = 0
    end = len(data)
    while at < end:
        line = data.find(b"\r\n", at, at + _SIZE_LINE_MAX)
        if line <= at:  # not found, or an empty size line
            return None
        size_hex = data[at:line]
        if size_hex.translate(None, _HEX_DIGITS):  # a sign, a space, "0x", an extension
            return None
        size = int(size_hex, 16)
        start = line + 2
        at = start + size
        if not size or data[at : at + 2] != b"\r\n":
            return None
        payloads.append(data[start:at])
        at += 2
    return payloads or None


class StateError(RuntimeError):
    """An illegal transition of a connection: a bug in the relay, never the engine's doing."""


class _Stop(Exception):
    """Raised in a parser callback to stop parsing: the rest of the read is not wanted."""


class _Connection(asyncio.Protocol):
    """One TCP connection and the exchange on it; ``state`` says where it stands."""

    def __init__(
        self,
        key: tuple[str, int],
        lost: Callable[[_Connection], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.key = key
        self._lost = lost  # tells the pool, which must not hand out a finished connection
        # Kept: asyncio.get_running_loop() costs a getpid() system call per call.
        self._loop = loop
        self.state = _IDLE
        self.reason = ""  # why it reached DIRTY or CLOSED
        self.transport: asyncio.Transport | None = None
        self._fd = -1
        self._family = socket.AF_INET
        self._poll: select.poll | None = None  # for usable(): one system call, no exception
        self.exchanges = 0  # requests written on this connection
        self.reused = False  # the exchange under way is not the connection's first
        self.done_at = 0.0  # loop time the last answer completed
        self.reuse_until = 0.0  # loop time after which the idle connection is not reused
        # Seconds from the end of a chunked answer to the engine closing the connection
        # while it was not in use; None when it did not (the pool learns from it).
        self.closed_after_chunked: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._last_data = 0.0
        self._waiter: asyncio.Future[None] | None = None
        # A callback-driven reader (gateway/direct.py) instead of a waiting task: called
        # when something new arrives, after the read that brought it has been parsed whole.
        self.listener: Callable[[], None] | None = None
        self._feeding = False  # inside feed_data: a wake-up is told after it returns
        self._woken = False
        self._begin(False)

    def _begin(self, head_only: bool) -> None:
        """The per-exchange part, new for each request: parser, answer, buffers."""
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_type = b""
        self.headers_done = False
        self.eof = False  # the answer is complete (its body may still be buffered)
        self.keep_alive = False
        self.keep_alive_timeout: float | None = None
        self.keep_alive_max: int | None = None
        self.error: UpstreamError | None = None
        self._interim = False  # inside a 1xx answer, which precedes the real one
        self._framed = False  # Content-Length or chunked: the end is not the connection's end
        self.chunked = False
        self.sized = False  # the answer's length is announced (Content-Length)
        self._after_chunked = False  # the previous answer on this connection was chunked
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self.splice: Splice | None = None  # the body written on here: see Splice
        # The parser has read the head and whole chunks of an event stream's body, no more:
        # a read of whole chunks may pass without it (data_received).
        self._between_chunks = False

    @property
    def closed(self) -> bool:
        return self.state in _FINAL

    # --- transitions -------------------------------------------------------------------------

    def _to(self, state: ConnState) -> None:
        if state not in _NEXT[self.state]:
            raise StateError(f"upstream connection {self.state.name} -> {state.name}")
        self.state = state

    def _end(self, state: ConnState, reason: str) -> None:
        """To DIRTY or CLOSED (once; later calls do nothing): closes the transport, tells
        the pool, and fails an exchange under way."""
        if self.state in _FINAL:
            return
        assert state in _FINAL
        unfinished = self.state is _SENT or self.state is _READING
        self._to(state)
        self.reason = reason
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()
        self._lost(self)
        if unfinished and self.error is None:
            self._fail(UpstreamError(f"connection to the model server closed: {reason}"))

    def send(self, head: bytes, body: bytes, head_only: bool, read_timeout: float) -> None:
        """IDLE -> SENT. Raises Dropped(sent=False) when the write failed at once."""
        self._to(_SENT)
        transport = self.transport
        assert transport is not None
        reused = self.reused = self.exchanges > 0
        self.exchanges += 1
        if reused:
            after_chunked = self.chunked
            self._begin(head_only)
            self._after_chunked = after_chunked
        else:  # __init__ began the first exchange: a second parser would be thrown away
            self._head_only = head_only
        small = len(body) < 65536
        if not transport.is_closing():
            transport.write(head + body if small else head)
        if transport.is_closing():
            # The transport fails a write that cannot start (a reset not yet seen) at once:
            # not one byte of this request left the relay.
            self._end(_CLOSED, "the write failed")
            raise Dropped(
                "the connection to the model server failed before the request was written",
                self.reused,
                sent=False,
            )
        if not small:
            transport.write(body)  # no copy of a large body
        # One timer per read_timeout period, re-armed from the time of the last data, not
        # one per wait: a token stream waits once per token.
        self._read_timeout = read_timeout
        self._last_data = self._loop.time()
        self._timer = self._loop.call_later(read_timeout, self._check_timeout)

    def make_idle(self, idle_timeout: float) -> bool:
        """DONE -> IDLE when the connection may carry another request; else it is closed.
        Returns whether it went IDLE."""
        if self.state is not _DONE:
            if self.state is _IDLE:
                raise StateError("upstream connection released twice")
            self._end(_DIRTY, "released before the end of the answer")
            return False
        window = idle_timeout
        if self.keep_alive_timeout is not None:
            timeout = self.keep_alive_timeout
            window = min(window, timeout - min(_KEEP_ALIVE_MARGIN, timeout / 4))
        if self._chunks:
            why = "released with part of the answer unread"
        elif not self.keep_alive:
            why = "not kept alive (Connection: close, HTTP/1.0 or HEAD)"
        elif self.keep_alive_max is not None and self.exchanges >= self.keep_alive_max:
            why = f"Keep-Alive: max={self.keep_alive_max} reached"
        elif window <= 0:
            why = "Keep-Alive timeout too short to reuse"
        else:
            self._to(_IDLE)
            self.reuse_until = self.done_at + window
            return True
        self._end(_CLOSED, why)
        return False

    def usable(self, now: float) -> bool:
        """Whether an IDLE connection from the pool can carry a request now. Looks at the
        socket without reading (one system call): an end, a reset or bytes the loop has not
        delivered yet are found before the request is written, not after."""
        if self.state is not _IDLE:
            raise StateError(f"a pooled upstream connection is {self.state.name}")
        if now >= self.reuse_until:
            self._end(_CLOSED, "idle for too long")
            return False
        if self._poll is None or not self._poll.poll(0):
            return True  # open, and nothing waiting
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, fileno=self._fd)
        try:
            pending = sock.recv(1, _PEEK_FLAGS)
        except BlockingIOError:
            return True  # open, and nothing waiting
        except OSError as exc:
            self._end(_CLOSED, f"reset by the model server while idle: {exc}")
            return False
        finally:
            sock.detach()  # the descriptor stays the transport's
        if pending:
            self._end(_DIRTY, "bytes from the model server while idle")
        else:
            self._end(_CLOSED, "closed by the model server while idle")
        return False

    def close(self, reason: str = "closed by the relay") -> None:
        self._end(_CLOSED, reason)

    def abandon(self) -> None:
        """The exchange is given up (an error, a cancellation): never reused."""
        self._end(_DIRTY, "exchange abandoned")

    def _complete(self) -> None:
        """READING -> DONE: the answer is whole."""
        self._to(_DONE)
        self.eof = True
        self.done_at = self._loop.time()
        self._stop_timer()
        self._wake()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport is not registered as an asyncio.Transport subclass.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
            self._family = sock.family
            if _POLL_EVENTS:
                self._poll = select.poll()
                self._poll.register(self._fd, _POLL_EVENTS)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is _SENT:
            self._to(_READING)
        elif state is not _READING:
            if state is _IDLE:
                self._end(_DIRTY, "bytes from the model server while idle")
            elif state is _DONE:
                self._end(_DIRTY, "bytes from the model server after the answer")
            return  # DIRTY, CLOSED: the transport is closing, nothing more is wanted
        self._last_data = self._loop.time()
        if self._between_chunks:
            # The parser stands between two chunks of an event stream: a read of whole
            # chunks (nearly every token event) passes without it, as the engine framed it
            # (see _whole_chunks). Written out here, not in a method: a frame less per event.
            splice = self.splice
            if len(data) >= _SPLICE_MAX:
                payloads = None
            else:
                line = data.find(b"\r\n", 0, _SIZE_LINE_MAX)
                if line > 0 and not (size_hex := data[:line]).translate(None, _HEX_DIGITS):
                    size = int(size_hex, 16)
                    at = line + 2 + size
                    if size and len(data) == at + 2 and data.endswith(b"\r\n"):
                        payloads = [data[line + 2 : at]]  # one chunk: a token event
                    else:
                        payloads = _whole_chunks(data)
                else:
                    payloads = None
            if payloads is None:
                # The parser reads it: where that leaves it is not known, so it reads the
                # rest of this answer too.
                self._between_chunks = False
            elif splice is not None and not self._chunks and self.error is None:
                splice.scan(payloads[0] if len(payloads) == 1 else b"".join(payloads))
                splice.transport.write(data if splice.chunked else b"".join(payloads))
                return
            # Not spliced: parsed as usual below, and whole chunks leave the parser between
            # two chunks again.
        parser = self._parser
        assert parser is not None  # let go only once the connection is lost (CLOSED)
        headers_were_done = self.headers_done
        self._feeding = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__  # what a callback raised
            if not isinstance(cause, _Stop):
                raise (cause or exc) from None  # a bug (StateError), not the engine's doing
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # HttpParserUpgrade: a 101 nobody asked for (the relay never forwards Upgrade).
            if self.state is _DONE:  # the answer is whole; what followed was not asked for
                self._end(_DIRTY, f"bytes from the model server after the answer: {exc}")
            else:
                self._fail(UpstreamError(f"invalid HTTP from the model server: {exc}"))
                self._end(_DIRTY, "invalid HTTP")
        finally:
            self._feeding = False
        if not headers_were_done and self.headers_done and self.chunked:
            self._between_chunks = self._body_starts_between_chunks(data)
        if self._woken:
            # Told once per read, after the parser is done with it: the listener may give
            # the connection back to the pool, which must not happen inside a callback.
            self._woken = False
            splice = self.splice
            if (
                splice is not None
                and self._chunks
                and not self.eof
                and self.error is None
                and self._buffered < _SPLICE_MAX
            ):
                # take(), framed and written here: see Splice (no frame more per event).
                chunks = self._chunks
                body = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                splice.scan(body)
                if splice.chunked:
                    splice.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
                else:
                    splice.transport.write(body)
                return
            listener = self.listener
            if listener is not None:
                listener()

    def _body_starts_between_chunks(self, data: bytes) -> bool:
        """Whether the read that completed a chunked answer's head left the parser between two
        chunks of an event stream's body: it holds the whole head (it begins with the status
        line, so the head ends at its first blank line) and after it only whole chunks."""
        if (
            self.eof
            or self.error is not None
            or not self.content_type.startswith(b"text/event-stream")
            or not data.startswith(b"HTTP/")
        ):
            return False
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        end += 4
        # An interim answer's head ends first: what follows it is not chunks (False).
        return end == len(data) or _whole_chunks(data[end:]) is not None

    def eof_received(self) -> bool:
        self._engine_closed(None)
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._engine_closed(exc)
        # The parser holds this protocol's callbacks and the transport holds the protocol:
        # both let go, so that the connection is freed with its last reference instead of
        # waiting for the cyclic collector. llama.cpp closes its connection after every
        # stream: the collector ran about every 55 streams for these, 15 us a stream
        # (measured, docs/performance.md).
        self.transport = None
        self._parser = None

    def _engine_closed(self, exc: Exception | None) -> None:
        state = self.state
        if state in _FINAL:
            return
        if ((state is _IDLE or state is _DONE) and self.chunked) or (
            state is _SENT and self._after_chunked
        ):
            self.closed_after_chunked = self._loop.time() - self.done_at
        if state is _SENT:
            self._fail(
                Dropped("the model server closed the connection before answering", self.reused)
            )
        elif state is _READING:
            if self.headers_done and not self._framed and exc is None:
                self._complete()  # a body delimited by the end of the connection
            else:
                self._fail(UpstreamError("the model server closed the connection mid-response"))
        how = f"reset by the model server: {exc}" if exc else "closed by the model server"
        self._end(_CLOSED, f"{how} while {state.name}")

    # --- httptools callbacks (while READING, or DONE for what follows an answer) -----------

    def on_message_begin(self) -> None:
        if self.state is _DONE:  # a second answer in the same read: stop before it
            self._end(_DIRTY, "a second answer from the model server")
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done:  # chunked trailers are not the answer's headers
            # Lowered once here: every reader of the names (framing below, the relay's
            # filter) compares them in lower case, and HTTP/2-style lower-case names are
            # what the relay sends on.
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called by the parser itself
        self.status = parser.get_status_code()
        if self.status == 101:  # the relay never forwards Upgrade: nobody asked for it
            self._fail(UpstreamError("invalid HTTP from the model server: 101 unasked"))
            self._end(_DIRTY, "invalid HTTP")
            raise _Stop
        if 100 <= self.status < 200:
            # 100 Continue, 103 Early Hints: HTTP clients skip interim answers.
            self._interim = True
            self.headers = []
            return
        self.keep_alive = parser.should_keep_alive()
        length = False
        coding: bytes | None = None
        for name, value in self.headers:  # the one pass that looks at header names
            if name == b"content-type":
                self.content_type = self.content_type or value
            elif name == b"content-length":
                length = True
            elif name == b"transfer-encoding":
                coding = value  # the last one holds the final coding
            elif name == b"keep-alive":
                self.keep_alive_timeout, self.keep_alive_max = keep_alive_params(value)
        # As the parser frames it (RFC 9112 section 6.3): chunked only as the final coding; any
        # other Transfer-Encoding means the body ends with the connection.
        self.chunked = coding is not None and is_chunked(coding)
        self._framed = self.chunked if coding is not None else length
        self.sized = coding is None and length  # framed by Content-Length
        self.headers_done = True
        if self._head_only:
            # A HEAD answer has no body whatever its Content-Length says; the parser cannot
            # be told so, so the connection is not reused.
            self.keep_alive = False
            self._complete()
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.state is _DONE:  # a body after a HEAD answer
            self._end(_DIRTY, "a body after a HEAD answer")
            raise _Stop
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_AT and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self.listener is not None:
            # _wake's answer for a listener, without the call: a parser callback runs only
            # inside feed_data, which tells the listener once the read is parsed whole.
            self._woken = True
        else:
            self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.state is _DONE:  # a HEAD answer, complete since its headers
            return
        self._complete()

    # --- used by Response --------------------------------------------------------------------

    def _check_timeout(self) -> None:
        self._timer = None
        if self.state is not _SENT and self.state is not _READING:
            return
        quiet = self._loop.time() - self._last_data
        if self._paused or quiet < self._read_timeout:
            # Paused: the client has not taken what was read, the model is not late.
            wait = self._read_timeout if self._paused else self._read_timeout - quiet
            self._timer = self._loop.call_later(wait, self._check_timeout)
            return
        self._fail(ReadTimeout(f"no data from the model server for {self._read_timeout:g} s"))
        self._end(_DIRTY, "read timeout")

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def arrival(self) -> asyncio.Future[None]:
        """A future done when something new arrives (headers, a chunk, the end) or an
        error. A future, not a coroutine: a token stream waits once per token."""
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def take(self) -> bytes:
        """What has arrived and was not taken yet (b"" when nothing), joined."""
        chunks = self._chunks
        if not chunks:
            return b""
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

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None and not self.eof:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        listener = self.listener
        if listener is not None:
            if self._feeding:
                self._woken = True
            else:
                listener()
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done: cancelled with the task that awaited it
                waiter.set_result(None)


class Response:
    """An answer being read. ``read()`` gives what has arrived, b"" at the end; ``release()``
    must follow, once (the connection goes back to the pool only after a complete answer)."""

    __slots__ = ("_conn", "_pool", "_released", "content_type", "headers", "sized", "status")

    def __init__(self, conn: _Connection, pool: UpstreamPool) -> None:
        self._conn = conn
        self._pool = pool
        self._released = False
        self.status = conn.status
        self.headers = conn.headers  # (name, value) pairs as sent, the names in lower case
        self.content_type = conn.content_type  # b"" when absent
        self.sized = conn.sized  # Content-Length: the whole length is known up front

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.headers:
            if key == name:
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
            await conn.arrival()

    def at_eof(self) -> bool:
        return self._conn.eof and not self._conn.has_data

    def release(self) -> None:
        if self._released:  # the connection may already carry another request
            return
        self._released = True
        self._pool.give_back(self._conn)


class UpstreamPool:
    """Keep-alive connections to the model servers, by (host, port).

    An idle connection is not reused after ``idle_timeout`` (engines close theirs: llama.cpp
    after 5 s), nor after the server's own ``Keep-Alive: timeout`` less a margin, nor within
    ``stream_settle`` of a chunked answer unless its server keeps such connections.
    """

    def __init__(self, idle_timeout: float = 4.0, stream_settle: float = _STREAM_SETTLE) -> None:
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._idle_timeout = idle_timeout
        self._settle = stream_settle
        self._open: set[_Connection] = set()
        # Servers seen keeping a connection open past stream_settle after a chunked answer.
        self._keeps_streams: set[tuple[str, int]] = set()

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
                await conn.arrival()
        except BaseException:
            conn.abandon()
            raise
        return Response(conn, self)

    def give_back(self, conn: _Connection) -> None:
        """Pools a connection whose answer was read to its end; closes any other."""
        if conn.state in _FINAL or not conn.make_idle(self._idle_timeout):
            return
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _IDLE_PER_SERVER:
            conn.close("the pool is full")
            return
        idle.append(conn)

    def close(self) -> None:
        for conn in list(self._open):
            conn.close("the pool closed")
        self._open.clear()
        self._idle.clear()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def idle_connections(self, host: str, port: int) -> int:
        return len(self._idle.get((host, port), ()))

    def keeps_streams(self, host: str, port: int) -> bool:
        """Whether connections to this server are reused right after a chunked answer."""
        return (host, port) in self._keeps_streams

    def reuse(self, key: tuple[str, int]) -> _Connection | None:
        """An idle connection to ``key`` that can carry a request now, taken from the pool
        (the caller sends on it, or closes it); None when there is none."""
        return self._reuse(key)

    async def connect(self, key: tuple[str, int], timeout: float) -> _Connection:
        """A new connection to ``key`` (ConnectFailed, ConnectTimeout or Dropped)."""
        return await self._connect(key, timeout)

    def _reuse(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = idle[-1]._loop.time()
        trusted = key in self._keeps_streams
        # From the most recently used, the least likely to be closed.
        for index in range(len(idle) - 1, -1, -1):
            conn = idle[index]
            settled = not conn.chunked or now - conn.done_at >= self._settle
            if not (settled or trusted):
                continue  # it may yet be closed by its server
            del idle[index]
            if conn.usable(now):
                if conn.chunked and not trusted:
                    self._keeps_streams.add(key)  # it outlived the settle time
                return conn
        return None

    async def _connect(self, key: tuple[str, int], timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        # A timer that cancels this task, not asyncio.timeout: llama.cpp closes its
        # connection after every stream, so each stream connects, and asyncio.timeout is
        # seven Python calls more (docs/performance.md).
        task = asyncio.current_task(loop)
        assert task is not None
        expired: list[bool] = []
        timer = loop.call_later(timeout, _expire, task, expired)
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(key, self._forget, loop), *key
            )
        except asyncio.CancelledError:
            if not expired or task.uncancel() > 0:
                raise  # cancelled by someone else (too)
            raise ConnectTimeout(f"cannot connect to {key[0]}:{key[1]}") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        finally:
            timer.cancel()
        if conn.closed:  # closed by the server before the loop handed it over
            raise Dropped("the model server closed the connection at once", False, sent=False)
        self._open.add(conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        """Called by a connection that reached DIRTY or CLOSED."""
        self._open.discard(conn)
        age = conn.closed_after_chunked
        if age is not None and age < self._settle:
            self._keeps_streams.discard(conn.key)  # it closes connections after streams
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)


def _expire(task: asyncio.Task[object], expired: list[bool]) -> None:
    """A connect took longer than its timeout: its task is cancelled, and told why."""
    expired.append(True)
    task.cancel()


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
