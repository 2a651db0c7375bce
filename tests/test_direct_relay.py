"""The direct relay (gateway/direct.py): the forwarding route's common case served from the
HTTP protocol's callbacks. Each test checks which path served a request (the protocol's
``exchange_ended`` for the direct path, ``hand_over`` for a request it gave to the ASGI
path), what the client got and what the record says. The rest of the suite runs through
the direct path wherever a request qualifies: test_http_conformance.py, test_relay_raw.py,
test_gateway.py and test_cut_reasons.py hold it to the ASGI path's answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_manager.gateway.direct import Exchange, Phase
from llm_manager.gateway.forward import _LARGE_BODY
from llm_manager.http_protocol import HttpProtocol
from tests.conftest import make_config, running_manager, wait_until
from tests.test_gateway import client, fake_model, records
from tests.test_http_conformance import Client, engine_behind, post
from tests.test_relay_raw import events, raw_model, received


class Paths:
    """Which path served each request: "direct", or "handed over" (the ASGI path after
    the direct relay read the request), in order of their ends or hand-overs."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def direct(self) -> int:
        return self.seen.count("direct")

    def handed(self) -> int:
        return self.seen.count("handed over")


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    found = Paths()
    ended, handed = HttpProtocol.exchange_ended, HttpProtocol.hand_over

    def exchange_ended(self: HttpProtocol, exchange: Exchange) -> None:
        found.seen.append("direct")
        ended(self, exchange)

    def hand_over(self: HttpProtocol, exchange: Exchange, app: Any) -> None:
        found.seen.append("handed over")
        handed(self, exchange, app)

    monkeypatch.setattr(HttpProtocol, "exchange_ended", exchange_ended)
    monkeypatch.setattr(HttpProtocol, "hand_over", hand_over)
    yield found


async def test_openai_requests_take_the_direct_path_and_their_records_are_whole(
    tmp_path: Path, spawn_log: Path, paths: Paths
) -> None:
    models = {"chat-model": fake_model(spawn_log, aliases=["chat"])}
    async with running_manager(make_config(tmp_path, models)) as mgr, client(mgr) as ai:
        # Stopped: the first request waits for a start, which is the ASGI path's work.
        first = await ai.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert first.choices[0].message.content == "hello " * 5
        assert paths.seen == ["handed over"]
        # Routing now: by alias (the body renamed), non-streamed and streamed.
        again = await ai.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert again.choices[0].message.content == "hello " * 5
        stream = await ai.chat.completions.create(
            model="chat-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        assert parts == [f"tok{i} " for i in range(5)]
        assert paths.seen == ["handed over", "direct", "direct"]
        rows = await records(mgr, limit="10")
        streamed, plain, started = rows  # newest first
        for row in rows:
            assert row["model"] == "chat-model" and row["status"] == 200
            assert row["endpoint"] == "/v1/chat/completions" and row["error"] is None
            assert row["ttfb_ms"] is not None and row["duration_ms"] >= row["ttfb_ms"]
        assert plain["prompt_tokens"] == started["prompt_tokens"] == 7
        assert plain["completion_tokens"] == started["completion_tokens"]
        assert streamed["stream"] is True and plain["stream"] is False
        assert streamed["completion_tokens"] is not None
        runtime = mgr.supervisor.resolve("chat-model")
        assert runtime.pending == 0 and runtime.admitted == 0


async def test_what_the_direct_path_does_not_serve_is_answered_as_before(
    tmp_path: Path, paths: Paths
) -> None:
    async with engine_behind(tmp_path) as (mgr, log):
        # Judged on the head (a query string): never read by the direct relay at all.
        status, _, body = await exchange_at(mgr, b"/v1/chat/completions?x=1", b'{"model": "m"}')
        assert status == 200 and paths.seen == []
        # Read, then handed over: the ASGI path answers as it always did.
        cases = [
            (b'{"model": "nope"}', 404, "model_not_found"),
            (b'{"model": 5}', 400, "invalid_request_error"),
            (b"[1, 2", 400, "invalid_request_error"),
            (b'{"messages": []}', 400, "invalid_request_error"),
        ]
        for data, want, kind in cases:
            status, _, body = await exchange_at(mgr, b"/v1/chat/completions", data)
            assert status == want, data
            error = json.loads(body)["error"]
            assert error["type"] == kind or error.get("code") == kind, (data, error)
        assert paths.seen == ["handed over"] * len(cases)
        # An embedding path for a chat model: the mode gate's 400, from the ASGI path.
        status, _, body = await exchange_at(mgr, b"/v1/embeddings", b'{"model": "m"}')
        assert status == 400 and "does not serve" in json.loads(body)["error"]["message"]
        assert len(received(log)) == 1  # only the request that named a served model


async def exchange_at(mgr: Any, target: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
    connection = await Client.open(mgr)
    try:
        await connection.send(
            b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        return await connection.answer()
    finally:
        connection.close()


async def test_one_client_connection_and_one_engine_connection_carry_many(
    tmp_path: Path, paths: Paths
) -> None:
    async with engine_behind(tmp_path) as (mgr, log):
        connection = await Client.open(mgr)
        for i in range(20):
            await connection.send(post(f"k{i}"))
            status, headers, body = await connection.answer()
            assert status == 200 and json.loads(body)["answer_to"] == f"k{i}"
            assert "date" in headers and float(headers["x-llm-manager-overhead-ms"]) >= 0
        connection.close()
        assert paths.direct() == 20 and paths.handed() == 0
        # The pooled connection to the engine carried them all.
        assert {r["conn"] for r in received(log)} == {received(log)[0]["conn"]}


async def test_a_client_leaving_mid_answer_stops_the_engine_and_is_recorded(
    tmp_path: Path, paths: Paths
) -> None:
    async with engine_behind(tmp_path, scenario="flood") as (mgr, log):
        connection = await Client.open(mgr)
        await connection.send(post("leaving"))
        head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await connection.reader.readexactly(100_000)
        connection.writer.transport.abort()
        conn = received(log)[0]["conn"]
        # The engine's connection is closed at once (no reuse of a half-read answer).
        await wait_until(lambda: any(e.get("conn") == conn for e in closed(log)), 10)
        rows = await records(mgr, limit="1")
        assert rows[0]["status"] == 499 and rows[0]["error"] == "client disconnected"
        runtime = mgr.supervisor.resolve("m")
        assert runtime.pending == 0 and runtime.admitted == 0 and runtime.gate.active == 0
        assert mgr.app.upstream.open_connections == 0
        assert paths.direct() == 0  # it never ended as an answer


def closed(log: Path) -> list[dict[str, Any]]:
    return [e for e in events(log) if e["event"] in ("eof", "closed")]


async def test_a_client_that_takes_nothing_is_cut_after_read_timeout(
    tmp_path: Path, paths: Paths
) -> None:
    models, log = raw_model(tmp_path, "flood")
    config = make_config(tmp_path, models, read_timeout="1s")
    async with running_manager(config) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        connection = await Client.open(mgr)
        await connection.send(post("stalled"))
        await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
        # Reading nothing: the buffers on both hops fill, then the relay gives up.
        rows: list[dict[str, Any]] = []

        async def recorded() -> bool:
            rows[:] = await records(mgr, limit="1")
            return bool(rows)

        for _ in range(100):
            if await recorded():
                break
            await asyncio.sleep(0.1)
        assert rows and rows[0]["status"] == 499
        assert rows[0]["error"] == "the client took no data for 1 s (read_timeout)"
        assert await connection.closed()
        connection.close()
        runtime = mgr.supervisor.resolve("m")
        assert runtime.pending == 0 and runtime.admitted == 0


async def test_the_phases_refuse_an_illegal_move() -> None:
    exchange = Exchange.__new__(Exchange)
    exchange.phase = Phase.DONE
    with pytest.raises(RuntimeError, match="DONE -> ANSWERING"):
        exchange._to(Phase.ANSWERING)


async def test_an_engine_that_fails_before_answering_gets_the_asgi_paths_error(
    tmp_path: Path, paths: Paths
) -> None:
    """close-after-read: the engine reads the second request on a connection and closes.
    A POST the engine may have read is never sent twice: 502, as the ASGI path answers."""
    async with engine_behind(tmp_path, scenario="close-after-read") as (mgr, log):
        connection = await Client.open(mgr)
        await connection.send(post("one"))
        assert (await connection.answer())[0] == 200
        await connection.send(post("two"))
        status, _, body = await connection.answer()
        assert status == 502
        assert "not sent again" in json.loads(body)["error"]["message"]
        # The client's connection goes on.
        await connection.send(post("three"))
        status, _, body = await connection.answer()
        assert status == 200 and json.loads(body)["answer_to"] == "three"
        connection.close()
        assert [json.loads(bytes.fromhex(r["body"]))["id"] for r in received(log)] == [
            "one",
            "two",
            "three",
        ]
        assert paths.seen == ["direct", "handed over", "direct"]


async def test_the_official_client_streams_through_the_direct_path_under_load(
    tmp_path: Path, spawn_log: Path, paths: Paths
) -> None:
    models = {"m": fake_model(spawn_log)}
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        ai = openai.AsyncOpenAI(base_url=mgr.url + "/v1", api_key="x", max_retries=0)

        async def one(i: int) -> list[str]:
            stream = await ai.chat.completions.create(
                model="m", messages=[{"role": "user", "content": str(i)}], stream=True
            )
            return [c.choices[0].delta.content async for c in stream if c.choices]

        async with ai:
            answers = await asyncio.gather(*(one(i) for i in range(24)))
        assert all(a == [f"tok{i} " for i in range(5)] for a in answers)
        assert paths.direct() == 24
        rows = await records(mgr, limit="30")
        assert len(rows) == 24 and {r["status"] for r in rows} == {200}


@pytest.mark.parametrize("char", [b"\x00", b"\x01", b"\x0b", b"\x1f", b"\x7f", b"\r"])
def test_the_upstream_parser_refuses_control_characters_in_header_values(char: bytes) -> None:
    """The direct relay sends the model server's header values on unchecked: it relies on
    llhttp refusing an answer that uvicorn would refuse to send."""
    parser = httptools.HttpResponseParser(object())
    with pytest.raises(httptools.HttpParserError):
        parser.feed_data(b"HTTP/1.1 200 OK\r\nX-A: a" + char + b"b\r\nContent-Length: 0\r\n\r\n")


async def test_a_shutdown_lets_a_direct_answer_finish_then_closes_its_connection(
    tmp_path: Path, spawn_log: Path, paths: Paths
) -> None:
    models = {"m": fake_model(spawn_log, "--chunks", "10", "--chunk-delay", "0.1")}
    body = b'{"model": "m", "stream": true, "messages": []}'
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        connection = await Client.open(mgr)
        await connection.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        head = await asyncio.wait_for(connection.reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head
        rest = asyncio.create_task(connection.reader.read())  # to the connection's end
        # Leaving the block shuts the server down while the answer is still streaming.
    data = await asyncio.wait_for(rest, 10)
    connection.close()
    assert data.count(b"data: ") >= 10 and data.endswith(b"0\r\n\r\n")
    assert b"[DONE]" in data
    assert paths.seen == ["direct"]


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _Server:
    """The protocol side of an exchange, for the unit test below."""

    def __init__(self, loop: asyncio.AbstractEventLoop, paused: bool) -> None:
        self.transport = _Transport()
        self.loop = loop
        self.paused = paused
        self.ended: list[Exchange] = []

    def default_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"date", b"today")]

    def writing_paused(self) -> bool:
        return self.paused

    def hand_over(self, exchange: Exchange, app: Any) -> None:
        raise AssertionError("not handed over")

    def exchange_ended(self, exchange: Exchange) -> None:
        self.ended.append(exchange)


def _unit_exchange(paused: bool) -> tuple[Exchange, _Server, list[Any], list[Any]]:
    """An exchange on a fake server protocol and relay, for the unit tests below: (the
    exchange, its server, the connections given back, the records written)."""
    from types import SimpleNamespace

    server = _Server(asyncio.get_running_loop(), paused=paused)
    given_back: list[Any] = []
    recorded: list[Any] = []
    relay = SimpleNamespace(
        settings=SimpleNamespace(read_timeout=30.0),
        upstream=SimpleNamespace(give_back=given_back.append),
        record=recorded.append,
    )
    exchange = Exchange(relay, server, {"path": "/v1/chat/completions"}, 2)  # type: ignore[arg-type]
    return exchange, server, given_back, recorded


async def test_an_answer_waits_while_an_earlier_one_fills_the_client_transport() -> None:
    """Unit test: a keep-alive client that has not read the previous answer yet (its
    transport is over the high-water mark when the next exchange begins) gets nothing
    more until it reads: the exchange starts paused, as uvicorn's cycle awaits the drain."""
    from types import SimpleNamespace

    from llm_manager.store.usage import RequestRecord

    exchange, server, given_back, recorded = _unit_exchange(paused=True)
    assert exchange._paused
    answer = [b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}']

    class Conn:  # an upstream connection whose whole answer has arrived
        headers_done = eof = sized = True
        status = 200
        headers = [(b"content-type", b"application/json"), (b"content-length", b"55")]
        content_type = b"application/json"
        error = None
        listener = None

        @property
        def has_data(self) -> bool:
            return bool(answer)

        def take(self) -> bytes:
            return answer.pop()

    conn = Conn()
    gate = SimpleNamespace(release=lambda: None)
    runtime = SimpleNamespace(gate=gate, dismiss=lambda: None, release=lambda: None, stops=0)
    exchange.phase = Phase.WAITING
    exchange._conn = conn  # type: ignore[assignment]
    exchange._runtime = runtime  # type: ignore[assignment]
    exchange._record = RequestRecord("m", "/v1/chat/completions", "POST")
    exchange._on_upstream()  # the whole answer has arrived
    assert server.transport.written == [] and exchange.phase is Phase.ANSWERING
    assert exchange._stall is not None  # the read_timeout for a client that never reads
    exchange.client_resumed()
    (written,) = server.transport.written
    assert written.startswith(b"HTTP/1.1 200 OK\r\ndate: today\r\n")
    assert written.endswith(
        b"\r\n\r\n" + b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    )
    assert exchange.phase is Phase.DONE and server.ended == [exchange]
    assert given_back == [conn] and exchange._stall is None
    assert recorded[0].status == 200 and recorded[0].completion_tokens == 4


async def test_a_bug_in_the_direct_checks_hands_the_request_over(
    tmp_path: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error while the direct relay checks a request (a bug) takes nothing
    and leaves the request to the ASGI path, which serves it (here: its own, unbroken
    model lookup)."""
    from llm_manager.gateway import direct

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    async with engine_behind(tmp_path) as (mgr, log):
        monkeypatch.setattr(direct, "_find_model", broken)
        status, _, body = await exchange_at(mgr, b"/v1/chat/completions", b'{"model": "m"}')
        assert status == 200 and json.loads(body)["seq"] == 0
        assert paths.seen == ["handed over"]
        runtime = mgr.supervisor.resolve("m")
        assert runtime.pending == 0 and runtime.admitted == 0


async def test_a_token_stream_is_written_on_by_the_engines_connection(
    tmp_path: Path, spawn_log: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a stream's head is out, each token event read from the engine goes to the
    client from the engine connection's own data_received (upstream.Splice): the
    exchange drains only the head with the first bytes and the end, not once per token.
    Every token arrives in order and the usage in the last event is recorded."""
    drains: list[int] = []
    drain = Exchange._drain

    def counted(self: Exchange, conn: Any) -> None:
        drains.append(1)
        drain(self, conn)

    monkeypatch.setattr(Exchange, "_drain", counted)
    models = {"m": fake_model(spawn_log, "--chunks", "40", "--chunk-delay", "0.003")}
    async with running_manager(make_config(tmp_path, models)) as mgr, client(mgr) as ai:
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        stream = await ai.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        parts = [c.choices[0].delta.content async for c in stream if c.choices]
        assert parts == [f"tok{i} " for i in range(40)]
        assert paths.seen == ["direct"]
        assert len(drains) <= 4  # the head (with or before the first bytes), the end
        (row,) = await records(mgr, limit="5")
        assert row["status"] == 200 and row["stream"] is True
        assert row["completion_tokens"] == 40 and row["prompt_tokens"] == 7
        assert row["ttfb_ms"] is not None and row["duration_ms"] > row["ttfb_ms"]


class _EngineTransport:
    """The engine connection's transport in the splice's unit tests: writes go nowhere."""

    def get_extra_info(self, name: str) -> None:
        return None

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _spliced_exchange() -> tuple[Exchange, _Server, Any, list[Any], list[Any]]:
    """An exchange (``_unit_exchange``) whose request went out on a real upstream connection
    (gateway/upstream.py) over a fake transport: feed the engine's reads to the connection's
    data_received. (the exchange, its server, the connection, given back, records)"""
    from types import SimpleNamespace

    from llm_manager.gateway.upstream import _Connection
    from llm_manager.store.usage import RequestRecord

    exchange, server, given_back, recorded = _unit_exchange(paused=False)
    conn = _Connection(("127.0.0.1", 1), lambda c: None, asyncio.get_running_loop())
    conn.connection_made(_EngineTransport())  # type: ignore[arg-type]
    runtime = SimpleNamespace(
        gate=SimpleNamespace(release=lambda: None), dismiss=lambda: None, release=lambda: None
    )
    exchange._runtime = runtime  # type: ignore[assignment]
    exchange._record = RequestRecord("m", "/v1/chat/completions", "POST", stream=True)
    exchange.phase = Phase.CONNECTING
    exchange._write(conn)  # WAITING, the connection SENT, its listener set
    return exchange, server, conn, given_back, recorded


def _client_payload(written: list[bytes]) -> tuple[bytes, list[bytes]]:
    """What the client reads from a chunked answer's writes: (the body, each chunk's size
    line as sent)."""
    body = b"".join(written)
    body = body[body.index(b"\r\n\r\n") + 4 :]
    payload = b""
    sizes = []
    while True:
        size, _, body = body.partition(b"\r\n")
        sizes.append(size)
        length = int(size, 16)
        assert body[length : length + 2] == b"\r\n"
        payload, body = payload + body[:length], body[length + 2 :]
        if length == 0:
            break
    assert body == b""
    return payload, sizes


async def test_a_spliced_stream_stops_while_the_client_does_not_read() -> None:
    """Unit test of the splice with a real upstream connection: reads are written on by
    the connection while the client reads; when the client's transport is full nothing
    more is written and the reads wait in the connection; once it drains, everything
    that waited goes out in order, and the stream goes on spliced to its end."""
    exchange, server, conn, given_back, recorded = _spliced_exchange()

    def data(i: int) -> bytes:
        return b'data: {"choices": [{"delta": {"content": "t%d"}}]}\n\n' % i

    def event(i: int) -> bytes:  # one chunk, as the engine sends a token
        return b"%x\r\n%b\r\n" % (len(data(i)), data(i))

    conn.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + event(0)
    )
    assert exchange.phase is Phase.ANSWERING and conn.splice is not None
    assert server.transport.written[0].startswith(b"HTTP/1.1 200 OK\r\n")
    for i in range(1, 4):
        conn.data_received(event(i))
    assert len(server.transport.written) == 4  # one write per read, spliced
    exchange.client_paused()  # the client's transport is full
    assert conn.splice is None
    for i in range(4, 8):
        conn.data_received(event(i))
    assert len(server.transport.written) == 4  # nothing more while the client is full
    exchange.client_resumed()
    assert len(server.transport.written) == 5 and conn.splice is not None
    conn.data_received(event(8))
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 9}}\n\n'
    conn.data_received(b"%x\r\n%b\r\n" % (len(usage), usage) + b"0\r\n\r\n")
    assert exchange.phase is Phase.DONE and given_back == [conn] and conn.splice is None
    payload, _ = _client_payload(server.transport.written)  # what waited went out as one
    assert payload == b"".join(data(i) for i in range(9)) + usage
    assert recorded[0].status == 200 and recorded[0].completion_tokens == 9


EVENT_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def _sse(i: int) -> bytes:
    return b'data: {"choices": [{"delta": {"content": "t%d"}}]}\n\n' % i


async def test_whole_chunks_pass_as_the_engine_framed_them() -> None:
    """Between two chunks of an event stream, a read of whole chunks goes to the client
    without the parser, framed as the engine framed it (here upper-case hex with leading
    zeros); a chunk with an extension, one cut by the read, and the last chunk with its
    trailer are read by the parser (and framed anew), and the parser reads the rest of
    that answer."""
    exchange, server, conn, given_back, recorded = _spliced_exchange()
    conn.data_received(EVENT_HEAD + b"%X\r\n%b\r\n" % (len(_sse(0)), _sse(0)))
    assert exchange.phase is Phase.ANSWERING and conn.splice is not None
    conn.data_received(b"%04X\r\n%b\r\n" % (len(_sse(1)), _sse(1)))  # passed
    two = b"".join(b"%04X\r\n%b\r\n" % (len(_sse(i)), _sse(i)) for i in (2, 3))
    conn.data_received(two)  # two whole chunks in one read: passed as one write
    assert server.transport.written[-1] == two
    cut = b"%x;ext=1\r\n%b\r\n" % (len(_sse(4)), _sse(4))
    conn.data_received(cut[:20])  # an extension, and cut: the parser's
    conn.data_received(cut[20:])
    conn.data_received(b"%04X\r\n%b\r\n" % (len(_sse(5)), _sse(5)))  # still the parser's
    usage = b'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 6}}\n\n'
    conn.data_received(b"%x\r\n%b\r\n0\r\nx-trailer: 1\r\n\r\n" % (len(usage), usage))
    assert exchange.phase is Phase.DONE and given_back == [conn]
    payload, sizes = _client_payload(server.transport.written)
    assert payload == b"".join(_sse(i) for i in range(6)) + usage
    n = len(_sse(1))
    assert sizes[:4] == [b"%x" % n, b"%04X" % n, b"%04X" % n, b"%04X" % n]  # as sent
    assert len(sizes) >= 8 and sizes[-1] == b"0"
    assert all(size == b"%x" % int(size, 16) for size in sizes[4:])  # framed anew
    assert recorded[0].status == 200 and recorded[0].completion_tokens == 6


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, int]:
    """An engine's event stream on the wire, cut into reads: (the reads, the SSE bytes, the
    completion tokens its usage says)."""
    count = draw(st.integers(0, 6))
    sse = b"".join(_sse(i) for i in range(count))
    sse += b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % count
    cuts = sorted(draw(st.sets(st.integers(1, len(sse) - 1), max_size=8)))
    wire = EVENT_HEAD
    for start, end in zip([0, *cuts], [*cuts, len(sse)], strict=True):
        size = b"%x" % (end - start)
        size = draw(st.sampled_from([size, size.upper(), b"0" + size, b"00" + size]))
        extension = draw(st.sampled_from([b"", b"", b"", b";x=1"]))
        wire += size + extension + b"\r\n" + sse[start:end] + b"\r\n"
    wire += draw(st.sampled_from([b"0\r\n\r\n", b"0\r\nx-trailer: 1\r\n\r\n"]))
    # Most reads are whole chunks (as engines write events), some cut anywhere.
    read_cuts = sorted(draw(st.sets(st.integers(1, len(wire) - 1), max_size=6)))
    reads = [wire[a:b] for a, b in zip([0, *read_cuts], [*read_cuts, len(wire)], strict=True)]
    return reads, sse, count


@settings(max_examples=200, deadline=None)
@given(stream=event_streams())
def test_an_event_stream_reaches_the_client_whole_however_it_is_framed_and_read(
    stream: tuple[list[bytes], bytes, int],
) -> None:
    """Whichever reads pass without the parser (whole chunks between two chunks) and which
    the parser reads, the client gets every byte of the stream in order, once, and the
    usage in its last event is recorded."""
    reads, sse, count = stream

    async def relay() -> None:
        exchange, server, conn, given_back, recorded = _spliced_exchange()
        for read in reads:
            conn.data_received(read)
        assert exchange.phase is Phase.DONE and given_back == [conn]
        payload, _ = _client_payload(server.transport.written)
        assert payload == sse
        assert recorded[0].status == 200 and recorded[0].completion_tokens == count

    asyncio.run(relay())


async def test_large_bodies_reach_the_engine_intact_on_the_direct_path(
    tmp_path: Path, paths: Paths
) -> None:
    """A body below forward._LARGE_BODY is joined from its parts at the end; one from that
    size on goes into one buffer as it arrives (no double hold): each reaches the engine
    byte for byte, through the direct path, in many reads."""
    async with engine_behind(tmp_path) as (mgr, log):
        sizes = (2 * 1024 * 1024, _LARGE_BODY + 12345)
        for ident, size in enumerate(sizes):
            head = b'{"model": "m", "id": "%d", "messages": [{"role": "user", "content": "' % ident
            tail = b'"}]}'
            filler = bytes(range(0x61, 0x7B)) * (size // 26 + 1)  # a-z, no JSON escapes
            body = head + filler[: size - len(head) - len(tail)] + tail
            assert len(body) == size
            status, _, answer = await exchange_at(mgr, b"/v1/chat/completions", body)
            assert status == 200 and json.loads(answer)["answer_to"] == str(ident)
            assert bytes.fromhex(received(log)[-1]["body"]) == body
        assert paths.seen == ["direct", "direct"]


async def test_an_ended_exchange_holds_no_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ended exchange stays its connection's cycle until the next request (and, once
    the connection closes, lives in a reference cycle with the protocol until the garbage
    collector runs): it lets go of the request body at its end. Held, eight idle
    keep-alive clients kept 8 MiB after 1 MiB requests, and the benchmark's peak RSS after
    its bodies rose from 89 to 136 MiB."""
    ended: list[tuple[HttpProtocol, Exchange]] = []
    original = HttpProtocol.exchange_ended

    def exchange_ended(self: HttpProtocol, exchange: Exchange) -> None:
        ended.append((self, exchange))
        original(self, exchange)

    monkeypatch.setattr(HttpProtocol, "exchange_ended", exchange_ended)
    async with engine_behind(tmp_path) as (mgr, log):
        body = b'{"model": "m", "id": "big", "pad": "' + b"x" * (1 << 20) + b'"}'
        connection = await Client.open(mgr)
        try:
            await connection.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            status, _, answer = await connection.answer()
            assert status == 200 and json.loads(answer)["answer_to"] == "big"
            assert bytes.fromhex(received(log)[-1]["body"]) == body
            ((protocol, exchange),) = ended
            assert protocol.cycle is exchange  # still the kept-alive connection's cycle
            assert exchange.phase is Phase.DONE and exchange.body == b""
        finally:
            connection.close()
