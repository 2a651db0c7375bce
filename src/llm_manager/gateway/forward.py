"""The forwarding route: any request that names a model is relayed to that model's server.

This is the hot path, kept as a plain ASGI callable: no framework validation, no
re-serialisation of the body, the answer relayed chunk by chunk as it arrives, usage
scanned incrementally. The client leaving cancels the upstream request at once, even
before the model has answered a byte.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

from llm_manager.errors import (
    BadRequest,
    BodyTooLarge,
    Forbidden,
    ManagerError,
    MethodNotAllowed,
    RouteNotFound,
    UpstreamFailed,
    UpstreamTimeout,
)
from llm_manager.gateway import endpoints
from llm_manager.gateway.model_field import read_fields, rename_model
from llm_manager.gateway.multipart import FormModel, form_model, is_multipart, rename_form_model
from llm_manager.gateway.upstream import (
    ConnectTimeout,
    Dropped,
    ReadTimeout,
    Response,
    UpstreamError,
    UpstreamPool,
    request_head,
)
from llm_manager.gateway.usage import SSEUsageScanner, Usage, from_json_bytes
from llm_manager.models.runtime import ModelRuntime, State
from llm_manager.models.supervisor import Supervisor
from llm_manager.store.usage import RequestRecord

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop headers (RFC 9110 §7.6.1), and those the relay sets itself on each side.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Expect: the relay reads the whole body before forwarding, so no "100 Continue" is wanted.
_DROP_REQUEST = _HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect"}
_IDENTITY = (b"accept-encoding", b"identity")  # relay bytes as they are, scannable for usage
_DROP_RESPONSE = _HOP_BY_HOP | {b"date", b"server"}
# 204 and 304 have no body: a Content-Length there (allowed for 304) would make the ASGI
# server wait for bytes that never come.
_DROP_BODILESS = _DROP_RESPONSE | {b"content-length"}
_NO_BUFFERING = (b"x-accel-buffering", b"no")
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # they name no other header
# Bodies from this size on are read into one preallocated buffer; smaller ones are joined
# from their parts at the end. The buffer holds a body once, but bytearray(n) zeroes it
# first: 80 us per MiB, 6% of a 1 MiB request's CPU (ab.py --body 1m: 0.95x without it),
# so it is kept for bodies large enough that holding them twice for a moment matters.
_LARGE_BODY = 8 * 1024 * 1024
_LEADING_SPACE = (b"", b" ", b"\t", b"\r", b"\n")
_JSON_SCAN_LIMIT = 16 * 1024 * 1024  # larger JSON answers are relayed but not scanned
WATCH_AFTER = 0.05  # seconds before a running request starts watching for its client leaving


class ClientGone(Exception):
    """The client disconnected before its request body was read."""


async def read_body(headers: list[tuple[bytes, bytes]], receive: Receive, limit: int) -> bytes:
    """A request's whole body, at most ``limit`` bytes (413 past it, at once when
    Content-Length says so). Raises ClientGone when the client leaves first."""
    declared = -1
    for name, value in headers:
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise BadRequest("invalid Content-Length header") from None
            if declared > limit:
                raise BodyTooLarge(f"request body of {declared} bytes exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        more = message.get("more_body", False)
        if not chunks and not more:
            return chunk  # the common case: the whole body in one message
        chunks.append(chunk)
        if more and declared >= _LARGE_BODY and size < declared:
            return await _read_large(receive, chunks, declared)
        if not more:
            return b"".join(chunks)


async def _read_large(receive: Receive, chunks: list[bytes], declared: int) -> bytes:
    """A large body of a known length, read into one buffer as it arrives: joining the
    chunks at the end would hold the body twice for a moment (a 20 MiB upload, 40)."""
    buffer = bytearray(declared)
    view = memoryview(buffer)
    at = 0
    for chunk in chunks:
        view[at : at + len(chunk)] = chunk
        at += len(chunk)
    chunks.clear()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        end = at + len(chunk)
        if end > declared:  # the server frames by Content-Length: not expected
            raise BadRequest("the request body is longer than its Content-Length")
        view[at:end] = chunk
        at = end
        if not message.get("more_body", False):
            break
    view.release()
    if at != declared:
        raise BadRequest("the request body is shorter than its Content-Length")
    # The bytearray goes on as the body (bytes-like everywhere it is used): no copy.
    return buffer  # type: ignore[return-value]


_KEY_HEADERS = frozenset({b"authorization", b"x-api-key"})


@dataclass(frozen=True)
class GatewaySettings:
    max_body_bytes: int
    connect_timeout: float
    read_timeout: float
    strip_keys: bool = False  # LLM-Manager's own keys are not the model server's
    stream_keepalive: float = 0.0  # SSE comments while a streamed request waits; 0 = off


ErrorResponder = Callable[[Scope, Receive, Send, ManagerError], Awaitable[None]]
RecordSink = Callable[[RequestRecord], None]


class Gateway:
    """ASGI app for ``ANY /{path}``. Stateless apart from the upstream connection pool."""

    def __init__(
        self,
        supervisor: Supervisor,
        settings: GatewaySettings,
        *,
        upstream: UpstreamPool,
        record: RecordSink,
        error: ErrorResponder,
    ) -> None:
        self._supervisor = supervisor
        self._settings = settings
        self._upstream = upstream
        self._record = record
        self._error = error
        self._drop = _DROP_REQUEST | _KEY_HEADERS if settings.strip_keys else _DROP_REQUEST
        # The passthrough keeps the client's Accept-Encoding: llama.cpp serves its web UI
        # only gzipped, to clients that accept gzip.
        self._drop_raw = self._drop - {b"accept-encoding"}
        self._loop: asyncio.AbstractEventLoop | None = None  # the serving loop, once known

    # What the direct relay (direct.py) shares with this path.
    @property
    def supervisor(self) -> Supervisor:
        return self._supervisor

    @property
    def settings(self) -> GatewaySettings:
        return self._settings

    @property
    def upstream(self) -> UpstreamPool:
        return self._upstream

    @property
    def record(self) -> RecordSink:
        return self._record

    @property
    def error(self) -> ErrorResponder:
        return self._error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        began = time.perf_counter()
        if scope["method"] == "OPTIONS" and _is_preflight(scope["headers"]):
            # CORS is off (the CORS layer answers preflights when it is on): a browser's
            # preflight is refused here, never forwarded, and starts nothing.
            await self._error(scope, receive, send, _PREFLIGHT_REFUSED)
            return
        try:
            body = await self._read_body(scope, receive)
            runtime, body, stream, target = self._target(scope, body)
        except ClientGone:
            return
        except _Redirect as redirect:
            await _send_redirect(scope, send, redirect.location)
            return
        except ManagerError as exc:
            await self._error(scope, receive, send, exc)
            return
        except Exception as exc:  # a bug: still a clear, logged answer; serving goes on
            log.exception("unexpected error reading %s %s", scope["method"], scope["path"])
            await self._error(scope, receive, send, _internal(exc))
            return
        await self._serve(runtime, scope, receive, send, body, began, stream, target)

    # --- request checks ---------------------------------------------------------------------

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        return await read_body(scope["headers"], receive, self._settings.max_body_bytes)

    def _target(self, scope: Scope, body: bytes) -> tuple[ModelRuntime, bytes, bool, bytes | None]:
        """The model a request is for, the body to send it, whether it asks for a stream,
        and the passthrough target when the request is the engine's own (None: the
        gateway's)."""
        path: str = scope["path"]
        if endpoints.ambiguous_path(scope["raw_path"]):
            raise BadRequest(
                "the path has dot segments, empty segments or encoded slashes; "
                "send the plain path (for example /v1/chat/completions)"
            )
        kind = endpoints.kind_of(path)
        if kind is None and path.startswith("/upstream/"):  # the model server's own paths
            runtime, target = self._passthrough(scope, scope["raw_path"])
            return runtime, body, False, target
        if kind is not None and scope["method"] != "POST":
            raise MethodNotAllowed(f"{scope['method']} is not allowed on {path}; use POST")
        name, named_in_body, stream, field = _find_model(scope, body)
        if name is None:
            referred = _referring_upstream(scope["headers"])
            if referred is not None:
                # A page of an engine's own UI opened through /upstream/<model>/ calls
                # absolute paths (/props, /slots) without naming a model: they go to that
                # model's server, as through /upstream/<model>/.
                runtime, target = self._passthrough(scope, referred + scope["raw_path"])
                return runtime, body, False, target
            if kind is None:
                raise RouteNotFound(f"no route {path} and no model named in the request")
            raise BadRequest("the request names no model: set 'model' in the JSON body")
        runtime = self._supervisor.resolve(name)
        if not endpoints.allowed(runtime.spec.mode, kind):
            mode = runtime.spec.mode
            article = "an" if mode[0] in "aeiou" else "a"
            raise BadRequest(
                f"model {runtime.name!r} is {article} {mode} model and does not serve {path}"
            )
        if named_in_body and name != runtime.name:
            # Called by an alias or a prefix: engines that check the name (vLLM, SGLang)
            # know the model by its configured name. Only those bytes change.
            if field is not None:
                body = rename_form_model(body, field, runtime.name)
            else:
                body = rename_model(body, runtime.name)
        return runtime, body, stream, None

    def _passthrough(self, scope: Scope, raw_path: bytes) -> tuple[ModelRuntime, bytes]:
        """``/upstream/{model}/{path}``: the model, and the target on its server
        (``/{path}`` and the query string). No mode gate, no model read from the body."""
        rest = raw_path[len(b"/upstream/") :]
        segment, slash, path = rest.partition(b"/")
        if not segment:
            raise RouteNotFound("name the model: /upstream/{model}/{path}")
        if not slash:
            # /upstream/<model>: its pages' relative links need the trailing slash. The
            # Location is relative, so it holds behind a proxy that adds a path prefix.
            raise _Redirect(segment + b"/")
        target = b"/" + path
        if endpoints.ambiguous_path(target):
            raise BadRequest(
                "the path has dot segments, empty segments or encoded slashes; "
                "send the plain path (for example /upstream/<model>/props)"
            )
        runtime = self._supervisor.resolve(unquote_to_bytes(segment).decode("utf-8", "replace"))
        if scope["query_string"]:
            target += b"?" + scope["query_string"]
        return runtime, target

    # --- relaying ---------------------------------------------------------------------------

    async def _serve(
        self,
        runtime: ModelRuntime,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        began: float,
        stream: bool,
        target: bytes | None = None,
    ) -> None:
        """One forwarded request from the model's door to the end of its answer: the turn
        door, the concurrency gate, the start, the exchange, the record. The common case
        (the model routing, a free slot) awaits nothing before the model server's answer:
        one coroutine per request here, not one per step (each costs CPU on every request).
        """
        perf_counter = time.perf_counter
        record = RequestRecord(runtime.name, scope["path"], scope["method"], stream=stream)
        loop = self._loop
        if loop is None or not loop.is_running():
            # Kept: asyncio.get_running_loop() and current_task() without a loop each cost a
            # getpid() system call (CPython 3.11), twice per request for nothing.
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        watcher = _DisconnectWatcher(receive, task, send, loop, self._settings.read_timeout)
        send = watcher.send
        # Most answers come back quickly: only a request still running after a moment gets
        # a task that watches for its client leaving (a task per request costs ~25% CPU).
        handle = loop.call_later(WATCH_AFTER, watcher.start)
        runtime.acquire()
        gate = runtime.gate
        queued = perf_counter()
        own_time = queued - began  # reading, checking: the gateway's own work
        entered = admitted = False
        stops = -1
        keepalive: _KeepAlive | None = None
        period = self._settings.stream_keepalive
        try:
            try:
                if period and stream and (runtime.state is not State.ROUTING or runtime.turn_ends):
                    keepalive = _KeepAlive(send, period, runtime.name)  # it may have to wait
                try:
                    if not runtime.try_admit():
                        await runtime.admit()  # its turn is over: wait until it is swapped
                    entered = True
                    if not gate.try_acquire():
                        await gate.acquire()  # 429 when the queue is full
                    admitted = True
                    if not runtime.routes_now():
                        await runtime.ensure_ready()  # 503 or 502 when it cannot start
                    record.wait_ms = (perf_counter() - queued) * 1000
                    stops = runtime.stops  # a stop from now on cuts this request: say so
                    if keepalive is not None:
                        await keepalive.stop()
                    upstream = await self._open(runtime, scope, body, target)  # 502 or 504
                except ManagerError as exc:
                    if isinstance(exc, UpstreamFailed) and stops >= 0 and runtime.stops != stops:
                        exc = UpstreamFailed(_stopped_while_answering(runtime))
                    record.status, record.error = exc.status, exc.message
                    if keepalive is not None:
                        await keepalive.stop()
                        if keepalive.started:  # the client already has a 200 and a stream
                            await send(_error_event(exc.message, exc.kind, exc.status))
                            return
                    await self._error(scope, receive, send, exc)
                    return
                # The gateway's own time runs on from here as if without the waits.
                own_from = perf_counter() - own_time
                started = keepalive is not None and keepalive.started
                try:
                    await self._pipe(
                        upstream, send, record, began, own_from, started, target, runtime, stops
                    )
                except UpstreamError:
                    if runtime.stops == stops:
                        raise
                    # Cut by a stop, an eviction or the manager's shutdown: the record
                    # says so (an event stream's error event already did).
                    record.error = _stopped_while_answering(runtime)
                finally:
                    upstream.release()
            finally:
                if keepalive is not None:
                    await keepalive.stop()
                if admitted:
                    gate.release()
                if entered:
                    runtime.dismiss()
        except asyncio.CancelledError:
            if watcher.fired is None:
                raise
            task.uncancel()  # the client left: waiting, queueing or generating stopped
            record.status = 499
            record.error = watcher.fired
        except Exception as exc:  # a bug: still a clear, logged answer; serving goes on
            log.exception("unexpected error relaying %s %s", scope["method"], scope["path"])
            record.error = f"internal error: {exc!r}"
            if record.status:
                raise  # the answer has begun: the connection is closed, as on any cut
            record.status = 500
            await self._error(scope, receive, send, _internal(exc))
        finally:
            handle.cancel()
            watcher.stop()
            runtime.release()
            record.ended_at = time.time()
            record.duration_ms = (perf_counter() - began) * 1000
            self._record(record)

    async def _open(
        self, runtime: ModelRuntime, scope: Scope, body: bytes, passthrough: bytes | None
    ) -> Response:
        port = runtime.port
        if port is None:  # stopped between becoming ready and here
            raise UpstreamFailed(f"model {runtime.name!r} is not running")
        if passthrough is None:
            target: bytes = scope["raw_path"]
            if scope["query_string"]:
                target += b"?" + scope["query_string"]
        else:
            target = passthrough
        headers = self.upstream_headers(runtime, scope["headers"], passthrough is not None)
        method: str = scope["method"]
        host = runtime.host  # this machine, or the engine's node in cluster mode
        head = request_head(method, target, f"{host}:{port}".encode(), headers, len(body))
        settings = self._settings
        request = functools.partial(
            self._upstream.request,
            host,
            port,
            head,
            body,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            head_only=method == "HEAD",
        )
        try:
            try:
                return await request()
            except Dropped as exc:
                # The retry rule (upstream.py): again only what certainly did not reach the
                # engine, or an idempotent request that met a reused connection closed before
                # any byte of the answer. A POST the engine may have read is never sent twice.
                if exc.may_retry(method, headers):
                    return await request(fresh=True)  # certainly a new connection
                if exc.reused:
                    raise UpstreamFailed(
                        f"the model server failed: {exc}; not sent again: the model server "
                        f"may have read this {method} request"
                    ) from None
                raise
        except ConnectTimeout:
            raise UpstreamFailed(
                f"cannot connect to the model server within "
                f"{settings.connect_timeout:g} s (connect_timeout)"
            ) from None
        except ReadTimeout:
            raise UpstreamTimeout(
                f"the model server sent nothing for {settings.read_timeout:g} s (read_timeout)"
            ) from None
        except UpstreamError as exc:
            raise UpstreamFailed(f"the model server failed: {exc}") from None

    def upstream_headers(
        self, runtime: ModelRuntime, received: list[tuple[bytes, bytes]], passthrough: bool
    ) -> list[tuple[bytes, bytes]]:
        """The client's request headers as the model server gets them: hop-by-hop ones
        and those the relay sets dropped, the engine's own key in place of the client's."""
        if not passthrough:
            drop = self._drop
            headers = [item for item in received if item[0] not in drop]
            headers.append(_IDENTITY)
        else:  # the client's Accept-Encoding goes through: the answer may come compressed
            drop = self._drop_raw
            headers = [item for item in received if item[0] not in drop]
        auth = runtime.engine_auth
        if auth is not None:  # the engine's own key ({api_key}), never the client's
            headers = [item for item in headers if item[0] not in _KEY_HEADERS]
            headers.append(auth)
        return headers

    async def _pipe(
        self,
        upstream: Response,
        send: Send,
        record: RequestRecord,
        began: float,
        own_from: float,
        started: bool = False,
        passthrough: bytes | None = None,
        runtime: ModelRuntime | None = None,
        stops: int = -1,
    ) -> None:
        record.status = upstream.status
        if started:  # keep-alive comments went out: the answer is already a 200 stream
            await _pipe_into_stream(upstream, send, record, runtime, stops)
            return
        content_type = upstream.content_type
        sse = content_type.startswith(b"text/event-stream")
        scan_json = b"json" in content_type
        if passthrough is not None and _encoded(upstream.headers):
            sse = scan_json = False  # compressed (the passthrough keeps Accept-Encoding)
        record.stream = sse or record.stream  # asked for, or answered as, a stream
        failing = upstream.status >= 400  # the engine's own error: its words go in the record
        headers = answer_headers(upstream.headers, upstream.status, sse or not upstream.sized)
        # The gateway's own time before the answer starts: its checks, plus the turnaround
        # of the model's headers (waits for a queue slot or a start are not counted).
        overhead = (time.perf_counter() - own_from) * 1000
        record.overhead_ms = overhead
        headers.append((b"x-llm-manager-overhead-ms", f"{overhead:.3f}".encode()))
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        scanner = SSEUsageScanner() if sse else None
        kept: list[bytes] = []
        kept_size = 0
        try:
            while True:
                chunk = await upstream.read()
                if not chunk:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    break
                if record.ttfb_ms is None:
                    record.ttfb_ms = (time.perf_counter() - began) * 1000
                # The chunk that completes the answer also ends it: one ASGI send (and one
                # write) fewer per request than a separate empty last message.
                last = upstream.at_eof()
                await send({"type": "http.response.body", "body": chunk, "more_body": not last})
                if scanner is not None:
                    scanner.feed(chunk)
                elif (scan_json or failing) and kept_size <= _JSON_SCAN_LIMIT:
                    kept.append(chunk)
                    kept_size += len(chunk)
                if last:
                    break
        except UpstreamError as exc:
            # Headers are out: the status cannot change. An event stream gets an error
            # event (OpenAI clients raise it); other bodies are cut short.
            record.status = 502
            record.error = _cut_message(runtime, stops, exc)
            if sse:
                await send(_error_event(record.error, "upstream_error", 502))
            else:
                raise
        finally:
            if scanner is not None:
                _apply(record, scanner.finish())
            elif kept and kept_size <= _JSON_SCAN_LIMIT:
                whole = b"".join(kept)
                if scan_json:
                    _apply(record, from_json_bytes(whole))
                if failing and not record.error:
                    text = whole[:2000].decode("utf-8", "replace").strip()[:500]
                    record.error = f"the model server answered {upstream.status}: {text}"
        if record.ttfb_ms is None:
            record.ttfb_ms = (time.perf_counter() - began) * 1000


async def _pipe_into_stream(
    upstream: Response,
    send: Send,
    record: RequestRecord,
    runtime: ModelRuntime | None,
    stops: int,
) -> None:
    """Relay the model's answer as the rest of an event stream already begun: an error
    answer becomes an error event (the status line has gone out as 200)."""
    if upstream.status >= 400 or not upstream.content_type.startswith(b"text/event-stream"):
        parts = []
        while chunk := await upstream.read():
            parts.append(chunk)
        text = b"".join(parts).decode("utf-8", "replace")[:2000]
        await send(_error_event(text, "upstream_error", upstream.status))
        return
    scanner = SSEUsageScanner()
    record.stream = True
    try:
        while chunk := await upstream.read():
            last = upstream.at_eof()
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            scanner.feed(chunk)
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except UpstreamError as exc:
        record.status = 502
        record.error = _cut_message(runtime, stops, exc)
        await send(_error_event(record.error, "upstream_error", 502))
    finally:
        _apply(record, scanner.finish())


def _error_event(message: str, kind: str, code: int) -> Message:
    """The last message of an event stream that failed: OpenAI clients raise it."""
    event = {"error": {"message": message, "type": kind, "code": code}}
    data = f"data: {json.dumps(event)}\n\n".encode()
    return {"type": "http.response.body", "body": data, "more_body": False}


class _KeepAlive:
    """While a streamed request waits for its model, an SSE comment every ``period``
    seconds (OpenAI clients ignore comments), so that a long load does not trip the
    client's or a proxy's timeout. The first comment commits the answer to a 200 event
    stream; until then nothing is sent, so a model that is ready quickly answers as usual.
    """

    __slots__ = ("_name", "_period", "_send", "_task", "started")

    def __init__(self, send: Send, period: float, name: str) -> None:
        self._send = send
        self._period = period
        self._name = name
        self.started = False
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._run())

    async def _run(self) -> None:
        line = f": waiting for model {self._name}\n\n".encode()
        while True:
            await asyncio.sleep(self._period)
            if not self.started:
                self.started = True
                await self._send(
                    {"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS}
                )
            await self._send({"type": "http.response.body", "body": line, "more_body": True})

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.exception()  # a send to a client that left failed: nothing more to do


_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    _NO_BUFFERING,
]


def _apply(record: RequestRecord, usage: Usage) -> None:
    usage = usage.completed()
    record.prompt_tokens = usage.prompt_tokens
    record.completion_tokens = usage.completion_tokens
    record.cache_n = usage.cache_n
    record.prompt_n = usage.prompt_n
    record.predicted_n = usage.predicted_n


def _find_model(scope: Scope, body: bytes) -> tuple[str | None, bool, bool, FormModel | None]:
    """``model`` from the JSON body (or the ``model`` field of a multipart form), else from
    ``?model=``; whether the body named it; whether the body asks for a stream; and the
    form field, for a multipart body that named it.

    A ``model`` that is present but not a non-empty string is 400.
    """
    query_model: str | None = None
    if scope["query_string"]:
        for key, value in parse_qsl(scope["query_string"].decode("latin-1")):
            if key == "model" and value:
                query_model = value
    first = body[:1]
    if first != b"{" and first != b"[" and first in _LEADING_SPACE:
        # Rare (b"" is in it too): look past leading whitespace. No body.lstrip() up
        # front: a large body is a bytearray (see _read_large), which lstrip would copy.
        first = body.lstrip()[:1]
        if not first:
            return query_model, False, False, None
    if first != b"{" and first != b"[":
        content_type = _content_type(scope.get("headers") or ())
        if is_multipart(content_type):
            # A form upload (audio transcriptions, image edits): its "model" field, as a
            # JSON body's, names the model; ?model= when the form has none.
            field = form_model(body, content_type)
            if field is not None:
                return field.name, True, False, field
        if query_model is not None:
            return query_model, False, False, None  # not JSON (a file upload): ?model=
        raise BadRequest("the request body is not JSON")
    try:
        fields = read_fields(body)
    except BadRequest:
        if query_model is not None:
            return query_model, False, False, None
        raise
    if not fields.has_model:
        return query_model, False, fields.stream, None
    name = fields.model
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("'model' must be a non-empty string")
    return name, True, fields.stream, None


def _content_type(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"content-type":
            return value
    return b""


def _encoded(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether an answer's body is compressed (Content-Encoding other than identity)."""
    for name, value in headers:  # names in lower case (upstream.py)
        if name == b"content-encoding" and value.strip().lower() != b"identity":
            return True
    return False


_UPSTREAM_PREFIX = b"/upstream/"


def _referring_upstream(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """``/upstream/<model>`` when the request comes from a page under it (its Referer)."""
    for name, value in headers:
        if name == b"referer":
            path = urlsplit(value).path
            if path.startswith(_UPSTREAM_PREFIX):
                segment = path[len(_UPSTREAM_PREFIX) :].partition(b"/")[0]
                if segment:
                    return _UPSTREAM_PREFIX + segment
            return None
    return None


class _Redirect(Exception):
    def __init__(self, location: bytes) -> None:
        super().__init__()
        self.location = location


async def _send_redirect(scope: Scope, send: Send, location: bytes) -> None:
    if scope["query_string"]:
        location += b"?" + scope["query_string"]
    headers = [(b"location", location), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 308, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def answer_headers(
    received: list[tuple[bytes, bytes]], status: int, unbuffered: bool
) -> list[tuple[bytes, bytes]]:
    """The model server's answer headers as the client gets them: hop-by-hop ones dropped
    (and those its Connection header names), Date and Server left to this server.
    ``unbuffered``: a stream, or an answer of unknown length (which may come piece by
    piece), that a proxy in front must not hold back. An answer of a known length loses
    nothing by being buffered, and each header costs the server a little."""
    headers = []
    drop = _DROP_BODILESS if status in (204, 304) else _DROP_RESPONSE
    named: bytes | None = None  # the Connection header's value, if any
    for name, value in received:  # names in lower case (upstream.py)
        if name not in drop:
            headers.append((name, value))
        elif name == b"connection":
            named = value
    if named is not None:
        headers = without_connection_named(headers, named)
    if unbuffered:
        headers.append(_NO_BUFFERING)
    return headers


def without_connection_named(
    headers: list[tuple[bytes, bytes]], connection: bytes
) -> list[tuple[bytes, bytes]]:
    """The headers less those that ``Connection`` names: hop-by-hop too (RFC 9110 §7.6.1)."""
    if connection.lower() in _PLAIN_CONNECTION:
        return headers  # the common values name no other header: no set to build
    named = {token.strip().lower() for token in connection.split(b",")} - {b""}
    if not named - _HOP_BY_HOP:
        return headers  # keep-alive, close: already dropped
    return [item for item in headers if item[0].lower() not in named]


def _cut_message(runtime: ModelRuntime | None, stops: int, exc: UpstreamError) -> str:
    """Why an answer broke off: the stop that cut it when the model was stopped (stop,
    eviction, shutdown) since the request was sent (``stops``: its count then, as in
    ``_relay``), else what the connection did."""
    if runtime is not None and runtime.stops != stops:
        return _stopped_while_answering(runtime)
    return f"model server failed mid-response: {exc!r}"


def _stopped_while_answering(runtime: ModelRuntime) -> str:
    why = runtime.stop_reason or "stopped"
    return f"model {runtime.name!r} was stopped while answering ({why})"


def _internal(exc: Exception) -> ManagerError:
    return ManagerError("internal error", f"{type(exc).__name__}; the manager's log has more")


_PREFLIGHT_REFUSED = Forbidden(
    "cross-origin requests are not allowed: CORS is off (see server.cors_origins)"
)


def _is_preflight(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"access-control-request-method" for name, _ in headers)


class _DisconnectWatcher:
    """Cancels a request's task when its client disconnects (once the body is read), or
    when a send to it has been blocked for ``limit`` seconds: a client that stops reading
    would otherwise hold its model's concurrency slot for ever. ``fired`` says why."""

    __slots__ = (
        "_limit",
        "_loop",
        "_receive",
        "_send",
        "_target",
        "_task",
        "_timer",
        "fired",
        "sending_since",
    )

    def __init__(
        self,
        receive: Receive,
        target: asyncio.Task[Any],
        send: Send,
        loop: asyncio.AbstractEventLoop,
        limit: float,
    ) -> None:
        self._receive = receive
        self._target = target
        self._send = send
        self._loop = loop
        self._limit = limit
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.fired: str | None = None
        self.sending_since = 0.0  # when the send in progress began; 0 when none is

    async def send(self, message: Message) -> None:
        self.sending_since = self._loop.time()
        await self._send(message)
        self.sending_since = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())
        # One timer per period, not one per send: a token stream sends once per token.
        self._timer = self._loop.call_later(self._limit, self._check_send)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    def _check_send(self) -> None:
        since = self.sending_since
        now = self._loop.time()
        if since and now - since >= self._limit:
            self._cancel(f"the client took no data for {self._limit:g} s (read_timeout)")
            return
        self._timer = self._loop.call_later(
            (since + self._limit - now) if since else self._limit, self._check_send
        )

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._cancel("client disconnected")
                return

    def _cancel(self, why: str) -> None:
        if self.fired is None:
            self.fired = why
            self._target.cancel()
