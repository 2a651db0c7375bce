"""The direct relay: the forwarding route's common case served from the HTTP server's
parser callbacks, with no ASGI cycle, no ASGI messages and no task per request.

The common case is a ``POST`` to an OpenAI endpoint (``/v1/chat/completions``...) over
HTTP/1.1 keep-alive, its body framed by Content-Length, no query string, naming a model in
its JSON body that routes now (ready, its turn not over, a free concurrency slot). Such a
request is read whole by the protocol (http_protocol.py), written to a pooled connection of
the model server (a new one is made by a short task when the pool has none), and the
answer is passed from that connection's ``data_received`` to the client's transport: a
token event costs one parse and one write, with no task woken.

Anything else is handed over, before a byte of it went to the model server, to the ASGI
path (forward.py: waits for a start, a queue slot or a turn, refusals, errors, uploads,
passthrough), which checks the request again from the start and answers it as it always
did. A failure of the model server before its answer began is answered there too (the
error responder is an ASGI app), so both paths give the same answers. What the direct path
does itself: the record (usage, times, the 499 of a client that left, the 502 of an answer
cut short), backpressure (the model server is read no faster than the client takes), the
read timeout for a client that takes nothing, and the retry rule of upstream.py.

An exchange's phases (``Phase``; ``Exchange._to`` refuses any other move)::

    RECEIVING --body whole, model routes--> WAITING --answer head--> ANSWERING --end--> DONE
        |                  |  (no pooled connection)           |            |
        |                  +--> CONNECTING --connected--> WAITING           |
        +--anything else: HANDED_OVER (the ASGI path answers)               |
    CONNECTING, WAITING --the model server failed--> HANDED_OVER (an error answer)
    any phase before DONE --client left, answer cut, client stalled--> CUT
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from llm_manager.auth import KeyCheck, presented, required
from llm_manager.errors import ManagerError, UpstreamFailed, UpstreamTimeout
from llm_manager.gateway import endpoints
from llm_manager.gateway.forward import (
    _JSON_SCAN_LIMIT,
    _LARGE_BODY,
    _apply,
    _cut_message,
    _error_event,
    _find_model,
    _stopped_while_answering,
    answer_headers,
)
from llm_manager.gateway.model_field import rename_model
from llm_manager.gateway.multipart import rename_form_model
from llm_manager.gateway.upstream import (
    ConnectTimeout,
    Dropped,
    ReadTimeout,
    Splice,
    UpstreamError,
    request_head,
)
from llm_manager.gateway.usage import SSEUsageScanner, from_json_bytes
from llm_manager.store.usage import RequestRecord
from llm_manager.web_guard import WebGuard

if TYPE_CHECKING:
    from llm_manager.gateway.forward import Gateway, Receive, Scope, Send
    from llm_manager.gateway.upstream import _Connection
    from llm_manager.models.runtime import ModelRuntime

log = logging.getLogger(__name__)

_LARGE_WRITE = 64 * 1024  # chunks from this size on are written apart, not joined (a copy)
_LAST_CHUNK = b"0\r\n\r\n"

App = Callable[["Scope", "Receive", "Send"], Any]


class Phase(enum.Enum):
    RECEIVING = "receiving"  # the request's body is arriving
    CONNECTING = "connecting"  # a new connection to the model server is being made
    WAITING = "waiting"  # the request is written; the answer's head has not come
    ANSWERING = "answering"  # the answer's head went out; its body is relayed
    DONE = "done"  # the answer is complete (final)
    HANDED_OVER = "handed over"  # the ASGI path answers it (final here)
    CUT = "cut"  # the client left or stalled, or the answer broke off (final)

    __hash__ = object.__hash__  # members are singletons; Enum's own hash runs Python code


_ANSWERING = Phase.ANSWERING
_NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.RECEIVING: frozenset({Phase.CONNECTING, Phase.WAITING, Phase.HANDED_OVER, Phase.CUT}),
    # CONNECTING again: the new connection was closed before the request was written.
    Phase.CONNECTING: frozenset({Phase.CONNECTING, Phase.WAITING, Phase.HANDED_OVER, Phase.CUT}),
    Phase.WAITING: frozenset({Phase.CONNECTING, Phase.ANSWERING, Phase.HANDED_OVER, Phase.CUT}),
    Phase.ANSWERING: frozenset({Phase.DONE, Phase.CUT}),
    Phase.DONE: frozenset(),
    Phase.HANDED_OVER: frozenset(),
    Phase.CUT: frozenset(),
}
_RELAYING = frozenset({Phase.CONNECTING, Phase.WAITING, Phase.ANSWERING})


class PhaseError(RuntimeError):
    """An illegal move of an exchange: a bug in the relay, never a client's doing."""


class Server(Protocol):
    """What an exchange needs of the HTTP server protocol that read its request."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def default_headers(self) -> list[tuple[bytes, bytes]]: ...

    def writing_paused(self) -> bool:
        """Whether the client's transport is full (an earlier answer not read yet)."""

    def hand_over(self, exchange: Exchange, app: App | None) -> None:
        """The ASGI path answers the request (``app``; None: the server's own app)."""

    def exchange_ended(self, exchange: Exchange) -> None:
        """The answer is complete: the connection goes on to its next request, or closes."""


class _NoEvent:
    """uvicorn's protocol sets its cycle's ``message_event`` on a disconnect; an exchange
    has nothing waiting on one."""

    __slots__ = ()

    def set(self) -> None:
        return None


_NO_EVENT = _NoEvent()


class DirectRelay:
    """Decides which requests take the direct path, and holds what their exchanges share.
    One per application; no state of its own beyond its configuration."""

    def __init__(self, gateway: Gateway, keys: KeyCheck, guard: WebGuard | None) -> None:
        self.gateway = gateway
        self.supervisor = gateway.supervisor
        self.settings = gateway.settings
        self.upstream = gateway.upstream
        self.record = gateway.record
        self.error = gateway.error
        self._keys = keys
        self._guard = guard

    def accepts(self, path: str, raw_path: bytes, headers: list[tuple[bytes, bytes]]) -> int:
        """The declared body length of a POST that may take the direct path, else -1 (the
        ASGI path then serves it, refusals included)."""
        if endpoints.kind_of(path) is None or endpoints.ambiguous_path(raw_path):
            return -1
        declared = -1
        for name, value in headers:
            if name == b"content-length":
                if declared >= 0 or not value.isdigit():
                    return -1
                declared = int(value)
            elif name == b"transfer-encoding" or name == b"access-control-request-method":
                return -1
        if declared < 0 or declared > self.settings.max_body_bytes:
            return -1
        if self._guard is not None and self._guard.check(headers, True) is not None:
            return -1
        keys = self._keys
        if keys.enabled and not keys.allows(required("POST", path, False), presented(headers)):
            return -1
        return declared


class Exchange:
    """One request on the direct path, from its head to the end of its answer."""

    __slots__ = (
        "_began",
        "_buffer",
        "_bodiless",
        "_chunked",
        "_conn",
        "_connecting",
        "_declared",
        "_failing",
        "_head",
        "_headers",
        "_host",
        "_kept",
        "_kept_size",
        "_parts",
        "_paused",
        "_pending",
        "_port",
        "_received",
        "_record",
        "_relay",
        "_runtime",
        "_scan_json",
        "_scanner",
        "_server",
        "_sse",
        "_stall",
        "_stops",
        "_tries",
        "body",
        "disconnected",
        "keep_alive",
        "phase",
        "response_complete",
        "scope",
    )

    # uvicorn's protocol sets its current cycle's message_event on a disconnect
    message_event = _NO_EVENT

    def __init__(self, relay: DirectRelay, server: Server, scope: Scope, declared: int) -> None:
        self.phase = Phase.RECEIVING
        self._relay = relay
        self._server = server
        self.scope = scope
        self.keep_alive = True  # False once the server shuts down: closed after the answer
        self.response_complete = False
        self.disconnected = False  # set by uvicorn's protocol, read by nothing here
        self._began = time.perf_counter()
        self._declared = declared
        self._parts: list[bytes] = []
        self._buffer: bytearray | None = None
        self._received = 0
        self.body: bytes = b""
        self._runtime: ModelRuntime | None = None
        self._record: RequestRecord | None = None
        self._stops = -1
        self._host = ""
        self._port = 0
        self._head = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._tries = 0
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        # The answer
        self._chunked = False
        self._bodiless = False
        self._sse = False
        self._scan_json = False
        self._failing = False
        self._scanner: SSEUsageScanner | None = None
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._pending = b""  # the answer's head, sent with its first body bytes
        self._paused = server.writing_paused()  # the client's transport is full
        self._stall: asyncio.TimerHandle | None = None

    def _to(self, phase: Phase) -> None:
        if phase not in _NEXT[self.phase]:
            raise PhaseError(f"direct exchange {self.phase.name} -> {phase.name}")
        self.phase = phase

    # --- the request -----------------------------------------------------------------------

    def add_body(self, data: bytes) -> None:
        at = self._received
        self._received = end = at + len(data)
        if self._declared < _LARGE_BODY:
            self._parts.append(data)
            return
        # A large body goes into one buffer as it arrives: joining the parts at the end
        # would hold it twice for a moment (as forward.read_body does).
        if self._buffer is None:
            self._buffer = bytearray(self._declared)
        self._buffer[at:end] = data

    def request_complete(self) -> None:
        """The body is whole: relay it, or hand the request over."""
        if self._buffer is not None:
            self.body = self._buffer  # type: ignore[assignment]  # bytes-like, not copied
            self._buffer = None
        else:
            parts = self._parts
            self.body = parts[0] if len(parts) == 1 else b"".join(parts)
            self._parts = []
        try:
            runtime = self._admit()
        except Exception:  # a bug: the ASGI path answers (and logs) it as its own
            log.exception("direct relay: unexpected error checking a request")
            runtime = None
        if runtime is None:
            self._hand_over(None)
            return
        self._runtime = runtime
        relay = self._relay
        scope = self.scope
        headers = relay.gateway.upstream_headers(runtime, scope["headers"], False)
        self._headers = headers
        host, port = runtime.host, runtime.port
        assert port is not None  # _admit checked it
        self._host, self._port = host, port
        self._head = request_head(
            "POST", scope["raw_path"], f"{host}:{port}".encode(), headers, len(self.body)
        )
        self._stops = runtime.stops
        self._send(fresh=False)

    def _admit(self) -> ModelRuntime | None:
        """The model, admitted and holding a concurrency slot, when the request can go to it
        now; None when the ASGI path must serve it (which checks it all again)."""
        scope = self.scope
        try:
            name, named, stream, field = _find_model(scope, self.body)
            if name is None:
                return None
            runtime = self._relay.supervisor.resolve(name)
        except ManagerError:
            return None
        kind = endpoints.kind_of(scope["path"])
        if not endpoints.allowed(runtime.spec.mode, kind) or not runtime.routes_now():
            return None
        if runtime.port is None or runtime.turn_ends is not None:
            return None  # a turn is set: the ASGI path keeps streams alive while it ends
        if named and name != runtime.name:
            # Called by an alias or a prefix: only those bytes change (forward.py).
            if field is not None:
                self.body = rename_form_model(self.body, field, runtime.name)
            else:
                self.body = rename_model(self.body, runtime.name)
        runtime.acquire()
        if not runtime.try_admit():
            runtime.release()
            return None
        if not runtime.gate.try_acquire():
            runtime.dismiss()
            runtime.release()
            return None
        record = self._record = RequestRecord(runtime.name, scope["path"], "POST", stream=stream)
        record.wait_ms = 0.0  # it waited for nothing: a wait is the ASGI path's
        return runtime

    def _hand_over(self, app: App | None) -> None:
        self._to(Phase.HANDED_OVER)
        self._server.hand_over(self, app)

    # --- the model server ------------------------------------------------------------------

    def _send(self, fresh: bool) -> None:
        self._tries += 1
        relay = self._relay
        conn = None if fresh else relay.upstream.reuse((self._host, self._port))
        if conn is None:
            self._to(Phase.CONNECTING)
            self._connecting = self._server.loop.create_task(self._connect())
            return
        self._write(conn)

    async def _connect(self) -> None:
        relay = self._relay
        try:
            conn = await relay.upstream.connect(
                (self._host, self._port), relay.settings.connect_timeout
            )
        except UpstreamError as exc:
            self._connecting = None
            if self.phase is Phase.CONNECTING:
                self._failed_before_answer(exc)
            return
        self._connecting = None
        if self.phase is not Phase.CONNECTING:  # the client left meanwhile
            conn.close("not needed: the client left")
            return
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        self._to(Phase.WAITING)
        self._conn = conn
        conn.listener = self._on_upstream
        try:
            conn.send(self._head, self.body, False, self._relay.settings.read_timeout)
        except Dropped as exc:  # not one byte left: certainly not sent
            self._failed_before_answer(exc)

    def _on_upstream(self) -> None:
        """Something arrived from the model server (or it failed): called by the connection
        once per read, after the read is parsed whole."""
        phase = self.phase
        conn = self._conn
        assert conn is not None
        if phase is Phase.WAITING:
            if not conn.headers_done:
                if conn.error is not None:
                    self._failed_before_answer(conn.error)
                return
            self._answer_head(conn)
            conn.listener = self._on_answer
            phase = self.phase
        if phase is Phase.ANSWERING and not self._paused:
            self._drain(conn)

    def _on_answer(self) -> None:
        """The connection's listener once the answer's head is out: a read of the body, or
        its end. One frame less per token event than _on_upstream (measured: a smaller
        per-event path costs several times its in-process figure when each event finds
        the caches cold, docs/performance.md)."""
        conn = self._conn
        if self.phase is not _ANSWERING or conn is None:
            raise PhaseError(f"direct exchange: a read of the answer while {self.phase.name}")
        if not self._paused:
            self._drain(conn)

    def _failed_before_answer(self, exc: UpstreamError) -> None:
        """No byte of the answer came: the retry rule (upstream.py), else an error answer
        given by the ASGI path's error responder."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.listener = conn.splice = None
            conn.abandon()
        relay = self._relay
        settings = relay.settings
        # The retry rule (upstream.py), as the ASGI path applies it: once, on a new
        # connection, only what certainly did not reach the engine (or is idempotent).
        retry = isinstance(exc, Dropped) and exc.may_retry("POST", self._headers)
        if retry and self._tries < 2:
            self._send(fresh=True)  # certainly a new connection
            return
        error: ManagerError
        if isinstance(exc, ConnectTimeout):
            error = UpstreamFailed(
                f"cannot connect to the model server within "
                f"{settings.connect_timeout:g} s (connect_timeout)"
            )
        elif isinstance(exc, ReadTimeout):
            error = UpstreamTimeout(
                f"the model server sent nothing for {settings.read_timeout:g} s (read_timeout)"
            )
        elif isinstance(exc, Dropped) and exc.reused and exc.sent:
            error = UpstreamFailed(
                f"the model server failed: {exc}; not sent again: the model server "
                f"may have read this POST request"
            )
        else:
            error = UpstreamFailed(f"the model server failed: {exc}")
        runtime = self._runtime
        assert runtime is not None and self._record is not None
        if isinstance(error, UpstreamFailed) and runtime.stops != self._stops:
            error = UpstreamFailed(_stopped_while_answering(runtime))
        self._record.status, self._record.error = error.status, error.message
        self._end()
        respond = relay.error

        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            await respond(scope, receive, send, error)

        self._hand_over(answer)

    # --- the answer ------------------------------------------------------------------------

    def _answer_head(self, conn: _Connection) -> None:
        # The values are sent on as they came: the upstream parser (llhttp) refuses an
        # answer with a control character in a header value, which uvicorn would refuse
        # to send (tests/test_direct_relay.py checks the parser does).
        self._to(Phase.ANSWERING)
        # The body is held to the exchange's end (_end), not let go here: a 1 MiB body
        # freed here made the allocator give its memory back and fault it in again for the
        # next request (ab.py --body 1m, 5 rounds: 1.32 against 1.00 ms of CPU per request).
        if self._paused:
            self.client_paused()  # an earlier answer fills the client's transport
        record = self._record
        assert record is not None
        status = record.status = conn.status
        content_type = conn.content_type
        sse = self._sse = content_type.startswith(b"text/event-stream")
        self._scan_json = content_type.find(b"json") >= 0  # find: see usage.SSEUsageScanner
        self._failing = status >= 400
        record.stream = sse or record.stream
        if sse:
            self._scanner = SSEUsageScanner()
        headers = answer_headers(conn.headers, status, sse or not conn.sized)
        overhead = record.overhead_ms = (time.perf_counter() - self._began) * 1000
        headers.append((b"x-llm-manager-overhead-ms", f"{overhead:.3f}".encode()))
        parts = [_status_line(status)]
        for name, value in self._server.default_headers():
            parts += (name, b": ", value, b"\r\n")
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if status in (204, 304):
            self._bodiless = True
        elif not conn.sized:
            self._chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        self._pending = b"".join(parts)

    def _drain(self, conn: _Connection) -> None:
        """Relay what has arrived: one write (one system call) per read of the model server."""
        parts = [self._pending] if self._pending else []
        self._pending = b""
        chunk = conn.take()
        if chunk:
            record = self._record
            assert record is not None
            if record.ttfb_ms is None:
                record.ttfb_ms = (time.perf_counter() - self._began) * 1000
            if self._scanner is not None:
                self._scanner.feed(chunk)
            elif (self._scan_json or self._failing) and self._kept_size <= _JSON_SCAN_LIMIT:
                self._kept.append(chunk)
                self._kept_size += len(chunk)
            if self._bodiless:
                pass
            elif not self._chunked:
                parts.append(chunk)
            elif len(chunk) < _LARGE_WRITE:
                parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
        ended = conn.eof  # and nothing left: all that had arrived was taken above
        if ended and self._chunked:
            parts.append(_LAST_CHUNK)
        if len(parts) == 1:
            self._server.transport.write(parts[0])
        elif parts:
            transport = self._server.transport
            if sum(map(len, parts)) < _LARGE_WRITE:
                transport.write(b"".join(parts))
            else:
                # A large chunk is not copied into a joined buffer.
                for part in parts:
                    transport.write(part)
        if ended:
            self._finish(conn)
        elif conn.error is not None:
            self._cut(conn.error)
        elif (
            chunk  # so the first bytes are out and timed (ttfb)
            and self._scanner is not None
            and conn.splice is None
            and not self._paused  # the write above may have filled the client's transport
            and not self._bodiless
        ):
            # An event stream: the connection writes the rest on itself while the client
            # reads (upstream.Splice), so a token's read makes no call into the exchange.
            conn.splice = Splice(self._server.transport, self._chunked, self._scanner.feed)

    def _finish(self, conn: _Connection) -> None:
        self._conn = None
        conn.listener = conn.splice = None
        self._relay.upstream.give_back(conn)
        self._complete()

    def _complete(self) -> None:
        """The answer is whole on the client's side: the connection goes on."""
        self._to(Phase.DONE)
        self._end()
        self.response_complete = True
        self._server.exchange_ended(self)

    def _cut(self, exc: UpstreamError) -> None:
        """The answer broke off after its head: an event stream ends with an error event
        (OpenAI clients raise it); any other answer is cut short, its connection closed."""
        record = self._record
        runtime = self._runtime
        assert record is not None and runtime is not None
        record.status = 502
        record.error = _cut_message(runtime, self._stops, exc)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.listener = conn.splice = None
            conn.abandon()
        transport = self._server.transport
        if self._sse and self._chunked and not self._paused:
            event = _error_event(record.error, "upstream_error", 502)["body"]
            transport.write(self._pending + b"%x\r\n%b\r\n" % (len(event), event) + _LAST_CHUNK)
            self._pending = b""
            self._complete()
            return
        self._to(Phase.CUT)
        self._end()
        transport.close()

    # --- the client ------------------------------------------------------------------------

    def client_lost(self) -> None:
        """The client's connection ended."""
        phase = self.phase
        if phase is Phase.RECEIVING:
            self._to(Phase.CUT)  # nothing was taken for it: no record, as on the ASGI path
            return
        if phase not in _RELAYING:
            return
        self._give_up("client disconnected")

    def client_paused(self) -> None:
        """The client's transport is full: read the model server no faster than it drains."""
        self._paused = True
        if self._conn is not None:
            self._conn.splice = None  # what arrives waits in the connection, which pauses
        if self.phase is Phase.ANSWERING and self._stall is None:
            self._stall = self._server.loop.call_later(
                self._relay.settings.read_timeout, self._stalled
            )

    def client_resumed(self) -> None:
        self._paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        conn = self._conn
        if self.phase is Phase.ANSWERING and conn is not None:
            self._drain(conn)

    def _stalled(self) -> None:
        self._stall = None
        if self._paused and self.phase is Phase.ANSWERING:
            limit = self._relay.settings.read_timeout
            self._give_up(f"the client took no data for {limit:g} s (read_timeout)")
            self._server.transport.close()

    def _give_up(self, why: str) -> None:
        record = self._record
        assert record is not None
        record.status = 499
        record.error = why
        task, self._connecting = self._connecting, None
        if task is not None:
            task.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.listener = conn.splice = None
            conn.abandon()
        self._to(Phase.CUT)
        self._end()

    # --- the end ---------------------------------------------------------------------------

    def _end(self) -> None:
        """Once per admitted request: the slot, the turn and the pending count given back,
        the usage read, the record written."""
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        # Let go of the body: the ended exchange stays the connection's cycle until its
        # next request, and in a reference cycle with the protocol once it closes.
        self.body = self._head = b""
        runtime, self._runtime = self._runtime, None
        record = self._record
        if runtime is None or record is None:
            return
        if self._scanner is not None:
            _apply(record, self._scanner.finish())
        elif self._kept and self._kept_size <= _JSON_SCAN_LIMIT:
            whole = b"".join(self._kept)
            if self._scan_json:
                _apply(record, from_json_bytes(whole))
            if self._failing and not record.error:
                text = whole[:2000].decode("utf-8", "replace").strip()[:500]
                record.error = f"the model server answered {record.status}: {text}"
        if record.ttfb_ms is None and record.status:
            record.ttfb_ms = (time.perf_counter() - self._began) * 1000
        runtime.gate.release()
        runtime.dismiss()
        runtime.release()
        record.ended_at = time.time()
        record.duration_ms = (time.perf_counter() - self._began) * 1000
        self._relay.record(record)


def _status_line(status: int) -> bytes:
    """The status line as uvicorn writes it on the ASGI path (its table covers 100-599)."""
    return STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status
