"""The HTTP/1.1 server protocol: uvicorn's httptools protocol with the limits it lacks.

uvicorn's httptools protocol (the one uvicorn picks, and the fastest it has) accepts a
request head of any size, waits for a head or a body forever, and appends a chunked
request's trailer fields to the request's headers, where the gateway would forward them to
the model server as if they were headers. Each was provoked by the raw-socket battery
(tests/test_http_conformance.py). This subclass adds, in the parser callbacks and the
``asyncio.Protocol`` methods that uvicorn's class implements:

- a limit on the request head (request line and header fields): ``431`` past it;
- a deadline for the whole head from its first byte, or from the connection's start for a
  connection that sends nothing (``408``, slowloris), and a limit on the time between two
  reads of a body (the connection is closed: the app may already be answering);
- trailer fields dropped (RFC 9110 §6.5.1 allows it; nothing here uses them);
- a refusal's connection closed lingering: the sending side ended, what the client still
  sends dropped for a moment, so the answer is read before the close resets it;
- the direct relay (gateway/direct.py): a request the app's relay accepts on its head is
  read and answered here, without uvicorn's cycle and task; one it cannot serve after all
  is handed to a uvicorn cycle with its body, as if uvicorn had read it. While a direct
  exchange runs it stands as the connection's ``cycle`` (pipelined requests queue behind
  it, shutdown waits for it), and its end does what uvicorn does at a cycle's end.

Besides the callbacks it uses these of uvicorn's class: ``transport``, ``loop``, ``url``,
``headers``, ``cycle``, ``scope``, ``parser``, ``flow``, ``server_state``,
``expect_100_continue``, ``tasks``, ``on_response_complete``, ``RequestResponseCycle``
and ``send_400_response``. A uvicorn release that changes them
fails the battery (tests/test_http_conformance.py, tests/test_direct_relay.py).

No timer runs on the common path: a head or a body that arrives whole in one read arms
none. A timer is armed only when a read ends with the head or the body still incomplete.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from llm_manager.gateway.direct import App, DirectRelay, Exchange, Phase

log = logging.getLogger("llm_manager")

MAX_HEAD_BYTES = 64 * 1024  # the request line and header fields together
HEAD_TIMEOUT = 30.0  # seconds for a whole head, from its first byte
BODY_TIMEOUT = 60.0  # seconds between two reads of a body
LINGER = 2.0  # seconds a refused request's connection drops what the client still sends


class _Reading(enum.Enum):
    """What the connection waits for from the client."""

    HEAD = "head"  # the next request's head (idle, or part of it has come)
    BODY = "body"  # the rest of the current request's body


class _Refused(Exception):
    """Raised in a parser callback to stop parsing a request already answered."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit, read deadlines and no trailers."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT
    body_timeout = BODY_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading = _Reading.HEAD
        self._heads = 0  # heads read whole on this connection
        self._head_bytes = 0  # bytes of an incomplete head from earlier reads (a bound)
        self._read_size = 0  # bytes of the current read
        self._refused = False  # answered 431 or 408: what still comes is dropped
        self._timer: asyncio.TimerHandle | None = None  # a head deadline or a body check
        self._last_read = 0.0  # loop time of the last read, while a body is awaited
        # The forwarding route's common case, served here without an ASGI cycle
        # (gateway/direct.py): the app's relay, and the exchange under way.
        # Not while uvicorn logs each request (log level debug): its access log is the
        # ASGI cycle's.
        relay = None if self.access_log else getattr(self.app, "direct", None)
        self._direct: DirectRelay | None = relay
        self._exchange: Exchange | None = None

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        # A connection that sends nothing (or only blank lines) is held no longer than a
        # slow head; the first complete head disarms it.
        self._arm(self.head_timeout, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        exchange = self._exchange
        if exchange is not None:
            self._exchange = None
            exchange.client_lost()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._exchange is not None:
            self._exchange.client_paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._exchange is not None:
            self._exchange.client_resumed()

    def shutdown(self) -> None:
        if self._exchange is not None:
            self._exchange.keep_alive = False  # closed once its answer is complete
            return
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what the client still sends after a refusal is read and dropped
        began, heads = self._reading, self._heads
        self._read_size = len(data)
        super().data_received(data)
        if self._refused:
            return
        if self._reading is _Reading.BODY:
            self._last_read = self.loop.time()
            if self._timer is None:
                self._arm(self.body_timeout, self._body_check)
        elif began is _Reading.HEAD and heads == self._heads:
            # No head completed in this read: it was all head (or blank lines before one).
            # After a request that ended in this read (pipelining), the next head's start
            # is at an offset the parser does not tell: it counts from the next read on,
            # and uvicorn's keep-alive timeout covers a client that stops there.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse_too_large()
            elif self._timer is None:
                self._arm(self.head_timeout, self._head_expired)

    # --- parser callbacks (httptools) ---------------------------------------------------------

    def on_headers_complete(self) -> None:
        self._reading = _Reading.BODY
        self._heads += 1
        if self._timer is not None:
            self._disarm()  # the head deadline is met
        # The head is at most its earlier reads and this read: only when that can exceed
        # the limit is it measured (its request line and fields, as parsed).
        earlier, self._head_bytes = self._head_bytes, 0
        if (
            earlier + self._read_size > self.max_head_bytes
            and self._head_size() > self.max_head_bytes
        ):
            self._refuse_too_large()
            raise _Refused  # stops the parser: the app is never called for this request
        relay = self._direct
        if relay is not None and self._exchange is None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:  # not pipelined behind an answer
                exchange = self._direct_exchange(relay)
                if exchange is not None:
                    self._exchange = exchange
                    self.cycle = exchange  # type: ignore[assignment]  # uvicorn's bookkeeping
                    self.headers = []  # trailers: as below
                    return
        super().on_headers_complete()
        # uvicorn appends every later field to this list, which is the request's
        # scope["headers"]: a chunked body's trailer fields would join the headers (and be
        # forwarded to the model server as headers). They go to a list no one reads.
        self.headers = []

    def _receiving(self) -> Exchange | None:
        """The direct exchange whose request body the parser is reading, if any."""
        exchange = self._exchange
        current: object = self.cycle
        if exchange is not None and current is exchange and exchange.phase is Phase.RECEIVING:
            return exchange
        return None

    def on_body(self, body: bytes) -> None:
        exchange = self._receiving()
        if exchange is not None:
            exchange.add_body(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._reading = _Reading.HEAD
        if self._timer is not None:
            self._disarm()
        exchange = self._receiving()
        if exchange is not None:
            exchange.request_complete()
            return
        super().on_message_complete()

    # --- the direct relay (gateway/direct.py) -------------------------------------------------

    def _direct_exchange(self, relay: DirectRelay) -> Exchange | None:
        """An exchange for a request the direct relay serves (judged on its head), else
        None: uvicorn's cycle and the ASGI app serve it."""
        parser = self.parser
        if (
            self.expect_100_continue
            or parser.get_method() != b"POST"
            or parser.get_http_version() != "1.1"
            or not parser.should_keep_alive()
            or parser.should_upgrade()
            or self.root_path
        ):
            return None
        url = self.url
        try:
            path = url.decode("ascii")
        except UnicodeDecodeError:
            return None
        # The plain path only: a query, an escape or an absolute form takes the ASGI path.
        # Tested on the str: `in` on bytes costs 0.45 us a test in CPython 3.11 (it tries
        # the operand as an integer first), on a str 0.04 us.
        if path[:1] != "/" or "?" in path or "%" in path or "#" in path:
            return None
        declared = relay.accepts(path, url, self.headers)
        if declared < 0:
            return None
        scope: dict[str, Any] = self.scope  # type: ignore[assignment]
        scope["method"] = "POST"
        scope["path"] = path
        scope["raw_path"] = url
        scope["query_string"] = b""
        return Exchange(relay, self, scope, declared)

    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return self.server_state.default_headers

    def writing_paused(self) -> bool:
        return bool(self.flow.write_paused)

    def hand_over(self, exchange: Exchange, app: App | None) -> None:
        """A request read by the direct relay is answered by an ASGI app after all: the
        server's own (which checks it from the start), or an error answer. Its body is
        whole; the cycle is uvicorn's, as if uvicorn had read the request."""
        if self._exchange is exchange:
            self._exchange = None
        cycle = RequestResponseCycle(
            scope=exchange.scope,  # type: ignore[arg-type]
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=exchange.keep_alive,
            on_response=self.on_response_complete,
        )
        cycle.body = exchange.body  # type: ignore[assignment]  # bytes: receive() copies none
        cycle.more_body = False
        cycle.message_event.set()  # as uvicorn's on_message_complete: the body is there
        current: object = self.cycle
        if current is exchange:  # not when a pipelined request is queued behind it
            self.cycle = cycle
        if self.transport.is_closing():
            cycle.disconnected = True
        # As uvicorn starts a cycle's task (the server waits for these at shutdown).
        task = self.loop.create_task(cycle.run_asgi(app or self.app))  # type: ignore[arg-type]
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def exchange_ended(self, exchange: Exchange) -> None:
        """The direct relay's answer is complete: as uvicorn ends a cycle."""
        if self._exchange is exchange:
            self._exchange = None
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _head_size(self) -> int:
        """The head's size as parsed: the target, and each field with its separators."""
        fields = sum(len(name) + len(value) + 4 for name, value in self.headers)
        return len(self.url) + fields + len("POST  HTTP/1.1\r\n\r\n")

    # --- deadlines ----------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self._reading is not _Reading.HEAD:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind an answer still being sent: a 408 now would land
            # inside that answer. The deadline waits for the answer's end.
            self._arm(self.head_timeout, self._head_expired)
        elif self._head_bytes:
            self._refuse(
                b"408 Request Timeout",
                f"the request head did not arrive whole within {self.head_timeout:g} s",
            )
        else:
            # A connection that has sent nothing: closed quietly, as uvicorn closes an
            # idle keep-alive connection.
            self._close()

    def _body_check(self) -> None:
        self._timer = None
        if self._reading is not _Reading.BODY:
            return
        loop = self.loop
        if not self.transport.is_reading():
            # Reading is paused because the app has not taken the body yet (flow control):
            # the client is not the one keeping it waiting.
            self._last_read = loop.time()
        idle = loop.time() - self._last_read
        if idle < self.body_timeout:
            self._arm(self.body_timeout - idle, self._body_check)
            return
        log.info("closing a connection: no body bytes for %g s", self.body_timeout)
        self._close()

    def send_400_response(self, msg: str) -> None:
        if not self._refused:  # a parse error, not the refusal that stopped the parser
            super().send_400_response(msg)

    def _refuse_too_large(self) -> None:
        self._refuse(
            b"431 Request Header Fields Too Large",
            f"the request line and headers exceed {self.max_head_bytes} bytes",
        )

    def _refuse(self, status: bytes, message: str) -> None:
        """Answers a request whose head cannot be read (no app was called for it) and
        closes the connection."""
        log.info("refusing a request: %s", message)
        self._refused = True
        transport = self.transport
        if not transport.is_closing():
            text = message.encode()
            transport.write(
                b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(text) + text
            )
            if transport.can_write_eof():
                # A close with unread bytes sends a reset, which can reach the client before
                # the answer is read: end the sending side, and drop what still comes for
                # a moment (a lingering close, as nginx does).
                transport.write_eof()
                self._arm(LINGER, self._close)
                return
        self._close()

    def _close(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()
